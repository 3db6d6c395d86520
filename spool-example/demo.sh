#!/bin/sh
# The bundled example, step by step: the README's first command runs it.
# It builds a fresh spool in spool-example/spool/ (ignored by git), so it can
# be run again and again and leaves the checkout clean.
set -eu
cd "$(dirname "$0")"
export JOBSPOOL_CONFIG="$PWD/jobspool.yaml"
rm -rf spool

step() {
    printf '\n$ %s\n' "$*"
    "$@" || echo "[exit $?]"
}
drop() {  # as WinSCP or rsync upload: write a hidden name, then rename it
    cp "jobs/$1" "spool/incoming/orders_in/.$1"
    mv "spool/incoming/orders_in/.$1" "spool/incoming/orders_in/$1"
    echo "dropped $1 into spool/incoming/orders_in/"
}

step jobspool init
step jobspool check orders_in jobs/order-1001.xml
step jobspool check orders_in jobs/order-1003-bad-qty.xml

printf '\n# A partner uploads four orders into the drop folder.\n'
for job in order-1001.xml order-1002.xml order-1003-bad-qty.xml order-1004-broken.xml; do
    drop "$job"
done
step jobspool status order-1001.xml

printf '\n# An in-house system queues an outbound order for a partner to fetch.\n'
cp jobs/order-1002.xml spool/order-2002.xml
step jobspool submit orders_out spool/order-2002.xml

printf '\n# The daemon checks, queues, runs the handler, logs and archives.\n'
printf '# (--once: stop when nothing is left to do; under systemd it runs on.)\n'
step jobspool daemon --once
step jobspool status order-1001.xml order-1002.xml order-1003-bad-qty.xml order-1004-broken.xml
step jobspool log order-1001.xml
step jobspool log order-1003-bad-qty.xml
step jobspool interfaces

printf '\n# The partner fetches the outbound order.\n'
mkdir -p spool/outbox
step jobspool fetch orders_out --to spool/outbox
step jobspool status order-2002.xml
printf '\n$ ls spool/bak/orders_in spool/joberrors\n'
ls spool/bak/orders_in spool/joberrors
printf '\nThe spool is in %s/spool; look around with ls -lR.\n' "$PWD"
