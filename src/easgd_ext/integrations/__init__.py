"""Entry points from other training frameworks, each an optional extra (the core needs torch
only): :mod:`easgd_ext.integrations.lightning` (``pip install 'easgd_ext[lightning]'``) and
:mod:`easgd_ext.integrations.accelerate` (``pip install 'easgd_ext[accelerate]'``)."""
