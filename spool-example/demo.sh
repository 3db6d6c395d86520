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

step jobspool init
step jobspool check orders_in jobs/order-1001.xml
step jobspool check orders_in jobs/order-1003-bad-qty.xml
for job in jobs/*.xml; do
    step jobspool submit orders_in "$job"
done
step jobspool queue orders_in
step jobspool status order-1001.xml order-1002.xml order-1003-bad-qty.xml order-1004-broken.xml
step jobspool log order-1001.xml
step jobspool log order-1003-bad-qty.xml
step jobspool interfaces
printf '\nThe spool is in %s/spool; look around with ls -lR.\n' "$PWD"
