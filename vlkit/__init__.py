"""vlkit: give language models eyes, cheaply and safely."""

import importlib
import sys
import warnings

__version__ = "0.1.0"

# transformers' auto modules -> what registers vlkit model directories with them (vlkit.models.auto)
_AUTO = {"transformers.models.auto.configuration_auto": "register_config",
         "transformers.models.auto.modeling_auto": "register_model"}


def _register(what: str) -> None:
    try:
        getattr(importlib.import_module("vlkit.models.auto"), what)()
    except Exception as e:  # noqa: BLE001 - never break importing transformers over this
        warnings.warn(f"vlkit: could not register with transformers' Auto classes ({e})", stacklevel=2)


class _AutoRegistration:
    """A meta path finder: when transformers loads one of its auto modules, vlkit registers with it right after
    (AutoConfig / AutoModel.from_pretrained then read vlkit directories), without `import vlkit` importing
    transformers."""

    def find_spec(self, name, path=None, target=None):
        if name not in _AUTO:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module, run=run, what=_AUTO[name]):
                run(module)
                _register(what)
            spec.loader.exec_module = exec_module
        return spec


def _install() -> None:
    for name, what in _AUTO.items():
        if name in sys.modules:  # transformers came first
            _register(what)
    if not all(name in sys.modules for name in _AUTO):
        sys.meta_path.insert(0, _AutoRegistration())


_install()
