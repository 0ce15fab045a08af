"""One module per paper. Importing this package registers every model variant.

Modules are discovered rather than listed so that adding a model is adding one file.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
