"""microsandbox cloud: where a microsandbox sandbox lives, this host's runtime or the cloud's.

Upstream's own SSH server is local-only (``msb ssh serve`` is "not available on cloud"), but
msb-proxy's bridge needs only what the SDK serves on its cloud backend too: the lifecycle calls,
``exec_stream`` (the guest agent runs the same there) and ``fs``. So cloud is a setting of the
microsandbox backend:

* ``backend = "microsandbox-cloud"`` (or ``--backend microsandbox-cloud``): every sandbox of
  that backend is in the cloud;
* ``backend = "microsandbox"`` with ``cloud = true``, or ``profile = "NAME"`` (a profile that
  ``msb login`` made), in a template: that sandbox is; ``cloud = false`` keeps it on this host
  whatever the environment says;
* neither: where the SDK's own default points (``MSB_BACKEND=cloud``, ``MSB_PROFILE``).

Credentials come only from the SDK's own sources, never from msb-proxy's files, and msb-proxy
writes none: a template's ``profile``; else the SDK's default when it is the cloud already
(``MSB_BACKEND=cloud`` with ``MSB_API_KEY``, or ``MSB_PROFILE``); else ``MSB_API_KEY`` (and
``MSB_API_URL`` for another endpoint) from the environment, handed to the SDK's
``backend_scope``. Each lifecycle call runs inside ``backend_scope`` of the sandbox's side; a
connected sandbox keeps the backend it was connected through, as the SDK's objects do.

What only a local runtime has is refused for a cloud sandbox, in one line: ``volumes`` (they
bind this host's directories), an ``image`` that is a directory of this host, and the SDK's
raw agent client (which msb-proxy does not use: its guest agent runs through ``exec_stream``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

from msb_proxy.backends.base import Check, CheckStatus
from msb_proxy.config import Option, SandboxTemplate, parse_string
from msb_proxy.errors import ConfigError

__all__ = ["CLOUD_OPTION", "NO_CREDENTIALS", "PROFILE_OPTION", "Side", "checks", "refusal",
           "scope"]

NO_CREDENTIALS = ("microsandbox cloud has no credentials here: set MSB_API_KEY (and MSB_API_URL "
                  "for another endpoint) or MSB_PROFILE in msb-proxy's environment, or profile "
                  "= \"NAME\" (a profile of 'msb login') in the sandbox's template; msb-proxy "
                  "keeps none itself")


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(value)


CLOUD_OPTION = Option(_parse_bool, "true or false")
PROFILE_OPTION = Option(parse_string, "the name of a profile of 'msb login'")


@dataclass(frozen=True)
class Side:
    """Which of the SDK's backends a sandbox lives on: ``cloud`` True, False, or None for the
    SDK's own default; ``profile`` the template's, if any."""

    cloud: bool | None = None
    profile: str | None = None

    @classmethod
    def of(cls, template: SandboxTemplate, always_cloud: bool) -> Side:
        profile = template.options.get("profile")
        cloud = template.options.get("cloud")
        if always_cloud or profile is not None:
            return cls(True, profile)
        return cls(cloud if isinstance(cloud, bool) else None)

    def resolved(self, sdk: ModuleType) -> bool:
        """Whether the sandbox is in the cloud, the SDK's default asked when it is its."""
        if self.cloud is not None:
            return self.cloud
        return bool(_default_kind(sdk) == sdk.BackendKind.CLOUD)


def _default_kind(sdk: ModuleType) -> object:
    """The SDK's default backend kind; None when its environment does not make one (the
    first call there says why)."""
    try:
        return sdk.default_backend_kind()
    except sdk.MicrosandboxError:
        return None


@contextlib.contextmanager
def scope(sdk: ModuleType, side: Side, config_file: object) -> Iterator[None]:
    """Make ``side`` the SDK's backend while the block runs (its ``backend_scope``)."""
    kinds = sdk.BackendKind
    environ = os.environ  # the SDK's own variables, read as the SDK reads them
    try:
        if side.profile is not None:
            chosen = sdk.backend_scope(kinds.CLOUD, profile=side.profile)
        elif side.cloud is None or \
                _default_kind(sdk) == (kinds.CLOUD if side.cloud else kinds.LOCAL):
            chosen = contextlib.nullcontext()  # the SDK's own default is that side
        elif not side.cloud:
            chosen = sdk.backend_scope(kinds.LOCAL)
        elif environ.get("MSB_API_KEY"):
            chosen = sdk.backend_scope(kinds.CLOUD, api_key=environ["MSB_API_KEY"],
                                       url=environ.get("MSB_API_URL") or None)
        else:
            raise ConfigError(NO_CREDENTIALS)
    except sdk.InvalidConfigError as exc:
        reason = str(exc).removeprefix("invalid config: ")
        raise ConfigError(f"microsandbox cloud: {reason}; see 'msb login', or the profile "
                          f"named in {config_file}") from None
    except ValueError:
        raise ConfigError(NO_CREDENTIALS) from None
    with chosen:
        yield


def refusal(name: str, template: SandboxTemplate, config_file: object) -> ConfigError | None:
    """Why sandbox ``name`` cannot be created in the cloud from ``template``, if it cannot."""
    if template.options.get("volumes"):
        return ConfigError(
            f"sandbox {name!r} is in microsandbox cloud, which cannot bind this host's "
            f"directories: remove volumes from its template in {config_file}, or keep it on "
            "this host (cloud = false)")
    image = template.options.get("image")
    if isinstance(image, str) and image.startswith("/"):
        return ConfigError(
            f"sandbox {name!r} is in microsandbox cloud, which cannot boot {image}, a "
            f"directory of this host: set image to an OCI image (such as \"debian:bookworm\") "
            f"in {config_file}, or keep it on this host (cloud = false)")
    return None


def checks(sdk: ModuleType, side: Side, config_file: object) -> list[Check]:
    """``doctor``'s rows for microsandbox cloud: where the credentials come from, and whether
    the SDK takes them (no request is made: listing the sandboxes, later, is that)."""
    try:
        with scope(sdk, side, config_file):
            info = sdk.default_backend_info()
    except ConfigError as exc:
        return [Check("cloud", CheckStatus.FAIL, str(exc))]
    except sdk.MicrosandboxError as exc:
        return [Check("cloud", CheckStatus.FAIL, f"the SDK refuses its settings: {exc}")]
    if str(info.kind) != "cloud":
        return [Check("cloud", CheckStatus.FAIL, NO_CREDENTIALS)]
    source = (f"profile {info.profile!r}" if info.profile else
              "MSB_API_KEY" if info.source == "programmatic" else
              f"the environment (the SDK's {info.source} setting)")
    return [Check("cloud", CheckStatus.OK,
                  f"{info.api_url or 'the default endpoint'}, credentials from {source}")]
