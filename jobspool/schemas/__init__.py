"""The XML schemas jobspool writes against: ``joblog.xsd`` and ``result.xsd``.

A package (this file) so that setuptools' ``package_data`` puts the ``.xsd``
files into the wheel: ``jobspool.joblog`` and ``jobspool.schedules`` open
them beside this file in every install, not only in a checkout.
"""
