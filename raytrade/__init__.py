"""raytrade, the application: the command line (``raytrade.cli``) and the running system (``raytrade.system``).

This package is the top of the import graph: it wires ``core``, ``cluster``,
``actors``, ``serve`` and ``tune`` together, and none of them imports it.
"""
