"""vlkit: give language models eyes, cheaply and safely."""

import importlib
import sys
import warnings

from vlkit.version import __version__  # noqa: F401

# transformers' auto modules -> what registers vlkit model directories with them (vlkit.models.auto)
_AUTO = {"transformers.models.auto.configuration_auto": "register_config",
         "transformers.models.auto.modeling_auto": "register_model"}


def _register(what: str) -> None:
    try:
        getattr(importlib.import_module("vlkit.models.auto"), what)()
    except Exception as e:  # noqa: BLE001 - never break importing transformers over this
        warnings.warn(f"vlkit: could not register with transformers' Auto classes ({e})", stacklevel=2)


class _ThenRegister:
    """The loader of one of transformers' auto modules, followed by vlkit's registration with it."""

    def __init__(self, loader, what: str):
        self.loader, self.what = loader, what

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register(self.what)


class _AutoRegistration:
    """A meta path finder: when transformers loads one of its auto modules, vlkit registers with it right after
    (AutoConfig / AutoModel.from_pretrained then read vlkit directories), without `import vlkit` importing
    transformers. It leaves sys.meta_path once both are loaded."""

    def find_spec(self, name, path=None, target=None):
        if name not in _AUTO:
            return None
        spec = None
        for finder in sys.meta_path:  # the finder that would have found it (never another of these)
            if type(finder).__name__ == "_AutoRegistration":
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenRegister(spec.loader, _AUTO[name])
        if all(n in sys.modules for n in _AUTO if n != name) and self in sys.meta_path:
            sys.meta_path.remove(self)  # the last one: nothing more to watch for
        return spec


def _install() -> None:
    for name, what in _AUTO.items():
        if name in sys.modules:  # transformers came first
            _register(what)
    if not all(name in sys.modules for name in _AUTO) and \
            not any(type(f).__name__ == "_AutoRegistration" for f in sys.meta_path):  # once, even if reloaded
        sys.meta_path.insert(0, _AutoRegistration())


_install()
