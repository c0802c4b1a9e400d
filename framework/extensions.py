"""The extension model: entrypoints, dependency providers and shared extensions.

An extension is declared on a service class (unbound, a prototype) and bound to each
container that hosts the class, which clones it from the recorded constructor
arguments. Constructors must therefore be free of side effects: real work happens in
``setup()``/``start()``.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from framework import concurrency
from framework.exceptions import IncorrectSignature

if TYPE_CHECKING:
    from framework.containers import ServiceContainer, WorkerContext

ENTRYPOINT_EXTENSIONS_ATTR = "nameko_entrypoints"

# What a dependency provider injects into workers (``DependencyProvider[Passwords]``).
Injected = TypeVar("Injected")


class Extension:
    """Base class of everything a container hosts, with a no-op lifecycle."""

    __params: tuple[tuple[Any, ...], dict[str, Any]]
    container: ServiceContainer = None  # type: ignore[assignment]

    def __new__(cls, *args: Any, **kwargs: Any) -> Extension:
        inst = super().__new__(cls)
        inst.__params = (args, kwargs)
        return inst

    def setup(self) -> None:
        """Called once the container is built, before any extension starts."""

    def start(self) -> None:
        """Called when the container starts; entrypoints begin receiving here."""

    def stop(self) -> None:
        """Graceful stop: finish what is in flight, then release resources."""

    def kill(self) -> None:
        """Stop now, releasing resources. Must not raise."""

    def clone(self) -> Extension:
        args, kwargs = self.__params
        return type(self)(*args, **kwargs)

    def bind(self, container: ServiceContainer) -> Extension:
        """A copy of this prototype bound to ``container``, with its sub-extensions."""
        if self.is_bound():
            raise RuntimeError("Cannot `bind` a bound extension.")
        instance = self.clone()
        instance.container = weakref.proxy(container)
        for name, ext in _sub_extension_members(self):
            setattr(instance, name, ext.bind(container))
        return instance

    def is_bound(self) -> bool:
        return self.container is not None

    def __repr__(self) -> str:
        if not self.is_bound():
            return f"<{type(self).__name__} [unbound] at 0x{id(self):x}>"
        return f"<{type(self).__name__} at 0x{id(self):x}>"


def _sub_extension_members(ext: Extension) -> list[tuple[str, Extension]]:
    # Only instance and class attributes, never properties: evaluating a property of
    # an unbound prototype (nameko does) can raise, e.g. a broadcast identifier.
    found: dict[str, Extension] = {}
    for klass in reversed(type(ext).__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Extension):
                found[name] = value
    for name, value in vars(ext).items():
        if isinstance(value, Extension) and name != "container":
            found[name] = value
    return sorted(found.items())


class SharedExtension(Extension):
    """One instance per container per ``sharing_key`` (e.g. one queue consumer)."""

    @property
    def sharing_key(self) -> Any:
        return type(self)

    def bind(self, container: ServiceContainer) -> Extension:
        existing = container.shared_extensions.get(self.sharing_key)
        if existing is not None:
            return existing
        instance = super().bind(container)
        container.shared_extensions[self.sharing_key] = instance
        return instance


class DependencyProvider(Extension, Generic[Injected]):
    """Injects an object into each worker as ``worker.<attr_name>``.

    Parameterised with what it injects, so a declaration types the attribute the
    service's methods see, without an annotation or ``type: ignore``::

        class Service:
            users = UserStore(Base)  # a DependencyProvider[UserRepository]

            def method(self) -> None:
                self.users.find_by_email(...)  # checked against UserRepository

    An unparameterised ``DependencyProvider`` injects ``Any``.
    """

    attr_name: str | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        # The declaration on the service class knows its name too, as in nameko.
        self.attr_name = name

    if TYPE_CHECKING:
        # For type checkers only: at run time the container sets the injected
        # object on the worker instance, which shadows the class attribute, so no
        # descriptor is needed (and none is wanted: it would slow every access).
        @overload
        def __get__(
            self, instance: None, owner: type[Any] | None = None
        ) -> DependencyProvider[Injected]: ...

        @overload
        def __get__(
            self, instance: object, owner: type[Any] | None = None
        ) -> Injected: ...

        def __get__(self, instance: object, owner: type[Any] | None = None) -> Any: ...

    def bind(self, container: ServiceContainer, attr_name: str) -> Extension:  # type: ignore[override]
        instance = super().bind(container)
        instance.attr_name = attr_name  # type: ignore[attr-defined]
        return instance

    def get_dependency(self, worker_ctx: WorkerContext) -> Injected:
        """The object injected into the worker (``None`` unless overridden)."""
        return None  # type: ignore[return-value]

    def worker_setup(self, worker_ctx: WorkerContext) -> None:
        """Before the service method runs."""

    def worker_result(
        self, worker_ctx: WorkerContext, result: Any = None, exc_info: Any = None
    ) -> None:
        """After the method, and after the entrypoint handled the result."""

    def worker_teardown(self, worker_ctx: WorkerContext) -> None:
        """Last thing in a worker's life."""

    def __repr__(self) -> str:
        if not self.is_bound():
            return f"<{type(self).__name__} [unbound] at 0x{id(self):x}>"
        service_name = self.container.service_name
        return f"<{type(self).__name__} [{service_name}.{self.attr_name}] at 0x{id(self):x}>"


class ProviderCollector:
    """Mixin for a shared extension that serves several providers.

    ``stop()`` waits until every provider has unregistered, so the shared resource
    (a consumer connection, say) outlives the last entrypoint that uses it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._providers: set[Any] = set()
        self._providers_registered = False
        self._last_provider_unregistered = concurrency.Event()
        super().__init__(*args, **kwargs)

    def register_provider(self, provider: Any) -> None:
        self._providers_registered = True
        self._providers.add(provider)

    def unregister_provider(self, provider: Any) -> None:
        self._providers.discard(provider)
        if not self._providers and not self._last_provider_unregistered.ready():
            self._last_provider_unregistered.send()

    def wait_for_providers(self) -> None:
        if self._providers_registered:
            self._last_provider_unregistered.wait()

    def stop(self) -> None:
        self.wait_for_providers()


def register_entrypoint(fn: Callable[..., Any], entrypoint: Entrypoint) -> None:
    descriptors = getattr(fn, ENTRYPOINT_EXTENSIONS_ATTR, None)
    if descriptors is None:
        descriptors = set()
        setattr(fn, ENTRYPOINT_EXTENSIONS_ATTR, descriptors)
    descriptors.add(entrypoint)


class Entrypoint(Extension):
    """Something that starts workers: an RPC method, an event handler, a timer..."""

    method_name: str | None = None

    def __init__(
        self,
        expected_exceptions: type[BaseException] | tuple[type[BaseException], ...] = (),
        sensitive_arguments: str | tuple[str, ...] = (),
        sensitive_variables: str | tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        self.expected_exceptions = expected_exceptions
        if sensitive_variables:
            warnings.warn(
                "sensitive_variables is deprecated, use sensitive_arguments",
                DeprecationWarning,
                stacklevel=2,
            )
        self.sensitive_arguments = sensitive_arguments or sensitive_variables
        super().__init__(**kwargs)

    def bind(self, container: ServiceContainer, method_name: str) -> Extension:  # type: ignore[override]
        instance = super().bind(container)
        instance.method_name = method_name  # type: ignore[attr-defined]
        return instance

    def check_signature(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Raise ``IncorrectSignature`` unless the method accepts these arguments."""
        method = getattr(self.container.service_cls, self.method_name)  # type: ignore[arg-type]
        # Whether a call binds depends only on how many positional arguments it
        # has and which keywords, never on their values: remember shapes that did.
        shape = (method, len(args), tuple(kwargs))
        if shape in _accepted_shapes:
            return
        try:
            _signature(method).bind(None, *args, **kwargs)
        except TypeError as exc:
            raise IncorrectSignature(str(exc)) from None
        if len(_accepted_shapes) < _MAX_ACCEPTED_SHAPES:
            _accepted_shapes.add(shape)

    @classmethod
    def decorator(cls, *args: Any, **kwargs: Any) -> Any:
        """``@entrypoint`` and ``@entrypoint(option=...)`` both work.

        The decorated function is returned unchanged, so service methods stay
        plainly callable (which is what ``worker_factory`` relies on).
        """

        def registering_decorator(
            fn: Callable[..., Any], args: tuple, kwargs: dict
        ) -> Any:
            register_entrypoint(fn, cls(*args, **kwargs))
            return fn

        if len(args) == 1 and not kwargs and inspect.isfunction(args[0]):
            return registering_decorator(args[0], args=(), kwargs={})
        return partial(registering_decorator, args=args, kwargs=kwargs)

    def __repr__(self) -> str:
        if not self.is_bound():
            return f"<{type(self).__name__} [unbound] at 0x{id(self):x}>"
        service_name = self.container.service_name
        return f"<{type(self).__name__} [{service_name}.{self.method_name}] at 0x{id(self):x}>"


_signatures: dict[Any, inspect.Signature] = {}
_accepted_shapes: set[tuple[Any, int, tuple[str, ...]]] = set()
_MAX_ACCEPTED_SHAPES = 10_000  # keyword names come from callers: stay bounded


def _signature(method: Callable[..., Any]) -> inspect.Signature:
    # inspect.signature is slow relative to an RPC round trip; cache per function.
    sig = _signatures.get(method)
    if sig is None:
        sig = _signatures[method] = inspect.signature(method)
    return sig


def is_extension(obj: Any) -> bool:
    return isinstance(obj, Extension)


def is_dependency(obj: Any) -> bool:
    return isinstance(obj, DependencyProvider)


def is_entrypoint(obj: Any) -> bool:
    return isinstance(obj, Entrypoint)


def iter_extensions(extension: Extension) -> Iterator[Extension]:
    """Depth-first over the sub-extensions of a bound extension."""
    for _, ext in _sub_extension_members(extension):
        yield from iter_extensions(ext)
        yield ext
