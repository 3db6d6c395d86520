"""jobspool's benchmarks: ``python -m bench [NAME...] [--quick] [--json FILE]``.

Each benchmark is a module of this package with a ``run`` function (see
``bench/__main__.py``). They measure jobspool as a user installs it, in
throwaway directories, and never write into the checkout: figures worth
keeping are pasted into ``docs/benchmarks.rst`` by hand.
"""
