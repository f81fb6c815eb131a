"""Authentication: who is connecting, decided once at connect from the Socket.IO auth payload.

Clients send `{"token": "..."}` as the Socket.IO `auth` payload. The token is either a static API
token (the config stores only its SHA-256, so a leaked config does not leak tokens) or a JWT whose
accepted algorithms, audience and issuer come from the config and never from the token itself.
Everything a client gets wrong raises `AuthError`, whose code and message are sent back with the
refused connection.

Authorization (what an identity may follow) lives in feed.security.access; this module only says
who it is.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feed.core.filters import parse_filter
from feed.errors import ConfigError, FeedError, ProtocolError
from feed.options import Options, stray_space

log = logging.getLogger("feed.auth")

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.-]+)\}")
"""A `{claim}` in a rule's row_filter template (filled per identity by feed.security.access)."""

MODES = ("none", "token", "jwt")
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
MAX_TOKEN_LENGTH = 16 * 1024
JWKS_LIFETIME = 300.0
"""Seconds a fetched JWKS is used before it is fetched again."""
JWKS_REFETCH = 30.0
"""Minimum seconds between fetches triggered by a token whose kid is not in the cached set."""
JWKS_RETRY = 5.0
"""Minimum seconds between fetches while no key set could be fetched yet: a failing or slow
identity provider is asked once per this time, not once per connecting client."""
JWKS_TIMEOUT = 5.0
"""Seconds a JWKS fetch may take in all (connecting, and reading the answer)."""
MAX_JWKS_BYTES = 1024 * 1024
"""Largest JWKS document read; real ones are a few kilobytes."""
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class AuthError(FeedError):
    """A connection refused: `code` is machine-readable, `message` says what to fix."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True)
class Identity:
    """Who a connection belongs to: rules match on `name`, `roles` and `claims`."""

    name: str
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)
    expires_at: float | None = None
    """Epoch seconds after which the identity must stop receiving (JWT `exp`)."""
    anonymous: bool = False
    source: str = "token"
    """Where the name comes from, "token" (a static token's name) or "jwt" (a subject)."""

    @property
    def account(self) -> str:
        """What per-identity limits count by: a JWT subject that happens to equal a static
        token's name (or another's) is not that token, and must not use up its allowance."""
        return f"{self.source}:{self.name}"

    def claim(self, path: str) -> Any:
        """A claim by name or dotted path (`org.id`), or None."""
        if path in self.claims:
            return self.claims[path]
        value: Any = self.claims
        for part in path.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
        return value

    def same_grants(self, other: Identity, claims: Iterable[str]) -> bool:
        """Whether a refreshed identity may keep the subscriptions this one was granted.

        `claims` are those the rules read (`AuthConfig.granting_claims`): the others do not
        decide access, and identity providers put per-token values in some (Azure AD's `uti`,
        `aio` and `rh` differ in every token it issues), which made every refresh fail.
        """
        return (
            self.name == other.name
            and self.source == other.source
            and self.roles == other.roles
            and all(self.claim(path) == other.claim(path) for path in claims)
        )


ANONYMOUS = Identity("anonymous", anonymous=True)


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticToken:
    name: str
    sha256: str
    roles: frozenset[str]
    claims: Mapping[str, Any]


@dataclass(frozen=True)
class JwtConfig:
    algorithms: tuple[str, ...]
    secret: str | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    audience: tuple[str, ...] = ()
    issuer: str | None = None
    name_claim: str = "sub"
    roles_claim: str = "roles"
    require: tuple[str, ...] = ("exp",)


@dataclass(frozen=True)
class Rule:
    """Who (names, roles, claims; all given conditions must hold) may follow which rooms."""

    allow: tuple[str, ...]
    identities: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    claims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    row_filter: str | None = None
    key: str = ""


@dataclass(frozen=True)
class MaskRule:
    fields: tuple[str, ...]
    rooms: tuple[str, ...] = ("*",)
    roles: tuple[str, ...] = ()
    """Applies only to identities with one of these roles; empty means everyone."""
    except_roles: tuple[str, ...] = ()


MAX_LEEWAY = 300.0
"""Seconds of clock skew `leeway` may tolerate at most (Kerberos allows 5 minutes too)."""


@dataclass(frozen=True)
class AuthConfig:
    mode: str = "none"
    allow_unauthenticated: bool = False
    leeway: float = 30.0
    tokens: tuple[StaticToken, ...] = ()
    jwt: JwtConfig | None = None
    rules: tuple[Rule, ...] = ()
    masks: tuple[MaskRule, ...] = ()
    operator_roles: tuple[str, ...] = ("admin",)
    """Roles that see connector status details (host, database, role names in errors)."""
    protect_status: bool = False
    """/metrics and /readyz's details only for a request bearing an operator's token."""

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def granting_claims(self) -> frozenset[str]:
        """The claims access depends on: those the rules match on or fill a row filter from."""
        names: set[str] = set()
        for rule in self.rules:
            names.update(rule.claims)
            names.update(PLACEHOLDER.findall(rule.row_filter or ""))
        return frozenset(names)

    def operator(self, identity: Identity) -> bool:
        """Whether this identity sees status details; others get a generic line (feed.app.status).

        Without auth on a loopback-only server everyone is the operator; with auth, or with
        `allow_unauthenticated`, only identities holding one of `operator_roles`.
        """
        if identity.anonymous:
            return not self.enabled and not self.allow_unauthenticated
        return bool(identity.roles.intersection(self.operator_roles))


def parse_auth(top: Options) -> AuthConfig:
    """Read the `[auth]` table; every mistake is one ConfigError naming the key."""
    if "auth" not in top.raw:
        return AuthConfig()
    opts = top.table("auth")
    mode = opts.choice("mode", MODES, "none")
    allow_unauth = opts.bool("allow_unauthenticated", False)
    # Clock skew between an identity provider and the feed is seconds; a leeway of hours would
    # quietly accept tokens that expired hours ago (and keep their connections open that long).
    leeway = opts.float(
        "leeway",
        30.0,
        minimum=0,
        maximum=MAX_LEEWAY,
        why=" (it would accept tokens expired that long ago: set the clocks right, by NTP)",
    )
    tokens = tuple(_parse_token(o) for o in _tables(opts, "tokens"))
    names = [t.name for t in tokens]
    for name in names:
        if names.count(name) > 1:
            opts.fail("tokens", f"token name {name!r} is used twice; names must be unique")
    jwt_config = _parse_jwt(opts.table("jwt")) if "jwt" in opts.raw else None
    rules = tuple(_parse_rule(o) for o in _tables(opts, "rules"))
    masks = tuple(_parse_mask(o) for o in _tables(opts, "masks"))
    # Read even when absent, so a misspelt `operator_role` is answered with this key's name.
    listed = opts.str_list("operator_roles")
    operator_roles = tuple(listed) if "operator_roles" in opts.raw else ("admin",)
    protect_status = opts.bool("protect_status", False)
    opts.finish()
    if mode == "token" and not tokens:
        opts.fail("tokens", 'mode "token" needs at least one [[auth.tokens]] entry')
    if mode == "jwt" and jwt_config is None:
        opts.fail("jwt", 'mode "jwt" needs an [auth.jwt] table (algorithms and a key)')
    if mode != "none" and not rules:
        log.warning("[auth] is on but has no [[auth.rules]]: every subscribe will be refused")
    return AuthConfig(
        mode,
        allow_unauth,
        leeway,
        tokens,
        jwt_config,
        rules,
        masks,
        operator_roles,
        protect_status,
    )


def _tables(opts: Options, key: str) -> list[Options]:
    entries = opts._get(key, [], False)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        opts.fail(key, f"must be an array of tables: write [[{opts.path(key)}]] for each entry")
    return [Options(e, f"{opts.path(key)}[{i}]") for i, e in enumerate(entries)]


def _parse_token(opts: Options) -> StaticToken:
    name = opts.str("name", required=True)
    digest = opts.str("sha256", required=True, spaces="inside").lower()
    if not SHA256_HEX.fullmatch(digest):
        opts.fail("sha256", "must be 64 hex digits: produce it with `feed hash-token`")
    roles = frozenset(opts.str_list("roles"))
    claims = opts._get("claims", {}, False)
    if not isinstance(claims, dict):
        opts.fail("claims", 'must be a table, like { tenant_id = "acme" }')
    opts.finish()
    return StaticToken(name, digest, roles, {**claims, "sub": name})


def _parse_jwt(opts: Options) -> JwtConfig:
    algorithms = tuple(opts.str_list("algorithms", required=True))
    for alg in algorithms:
        if alg not in HMAC_ALGORITHMS + KEY_ALGORITHMS:
            known = ", ".join(HMAC_ALGORITHMS + KEY_ALGORITHMS)
            opts.fail("algorithms", f"{alg!r} is not accepted (use some of {known})")
    hmac = [a for a in algorithms if a in HMAC_ALGORITHMS]
    if hmac and len(hmac) != len(algorithms):
        # One key could then verify both ways: the classic RS256/HS256 confusion.
        opts.fail("algorithms", "do not mix HS* with RS*/ES*/PS* algorithms in one config")
    secret = opts.str("secret")
    jwks_file = opts.str("jwks_file", spaces="inside")
    jwks_url = opts.str("jwks_url", spaces="none")
    audience = opts._get("audience", [], False)
    if isinstance(audience, str):
        audience = [audience]
    if not isinstance(audience, list) or not all(isinstance(a, str) and a for a in audience):
        opts.fail("audience", 'must be a string or a list of strings, like "feed"')
    for name in audience:  # compared whole with a token's `aud`: "feed\n" matches no token
        problem = stray_space(name)
        if problem is not None:
            opts.fail("audience", problem)
    issuer = opts.str("issuer", spaces="inside")
    name_claim = opts.str("name_claim", "sub")
    roles_claim = opts.str("roles_claim", "roles")
    require = opts._get("require", ["exp"], False)
    if not isinstance(require, list) or not all(isinstance(r, str) for r in require):
        opts.fail("require", 'must be a list of claim names, like ["exp"]')
    opts.finish()
    if hmac:
        if not secret:
            opts.fail("secret", "HS* algorithms need a shared secret (use ${JWT_SECRET})")
        if len(secret) < 32:
            opts.fail("secret", "must be at least 32 characters; a short secret can be guessed")
        if jwks_file or jwks_url:
            opts.fail("jwks_file", "HS* algorithms use `secret`, not a JWKS")
    else:
        if secret:
            opts.fail("secret", "RS*/ES*/PS* algorithms use a JWKS (jwks_file or jwks_url)")
        if bool(jwks_file) == bool(jwks_url):
            opts.fail("jwks_file", "give exactly one of jwks_file or jwks_url")
        if jwks_file:
            _load_jwks_file(jwks_file, opts.path("jwks_file"))
        if jwks_url and not jwks_url.lower().startswith(("https://", "http://")):
            # urllib would also read file:// and ftp:// URLs.
            opts.fail("jwks_url", f"must be an https:// (or http://) URL, not {jwks_url!r}")
    try:
        import jwt  # noqa: F401
    except ImportError:
        opts.fail("algorithms", "JWT support needs PyJWT: pip install '.[jwt]' from a checkout")
    return JwtConfig(
        algorithms,
        secret,
        jwks_file,
        jwks_url,
        tuple(audience),
        issuer,
        name_claim,
        roles_claim,
        tuple(require),
    )


def _parse_rule(opts: Options) -> Rule:
    allow = tuple(opts.str_list("allow", required=True))
    identities = tuple(opts.str_list("identities"))
    roles = tuple(opts.str_list("roles"))
    raw_claims = opts._get("claims", {}, False)
    if not isinstance(raw_claims, dict):
        opts.fail("claims", 'must be a table, like { plan = "pro" }')
    claims: dict[str, tuple[str, ...]] = {}
    for name, value in raw_claims.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str | int | bool) for v in values):
            opts.fail(f"claims.{name}", "must be a string, number, boolean or a list of them")
        claims[name] = tuple(_claim_text(v) for v in values)
    row_filter = opts.str("row_filter")
    opts.finish()
    if row_filter is not None:
        problem = check_template(row_filter)
        if problem:
            opts.fail("row_filter", problem)
    return Rule(allow, identities, roles, claims, row_filter, opts.where)


def _parse_mask(opts: Options) -> MaskRule:
    fields = tuple(opts.str_list("fields", required=True))
    rooms = tuple(opts.str_list("rooms") or ["*"])
    roles = tuple(opts.str_list("roles"))
    except_roles = tuple(opts.str_list("except_roles"))
    opts.finish()
    return MaskRule(fields, rooms, roles, except_roles)


def _claim_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _load_jwks_file(path: str, key: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the JWKS file {path}: {exc.strerror}", key=key) from None
    except ValueError as exc:
        raise ConfigError(f"the JWKS file {path} is not JSON: {exc}", key=key) from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ConfigError(f'the JWKS file {path} must be an object with "keys"', key=key)
    return data


# -- binding -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: AuthConfig, host: str) -> None:
    """Refuse to serve without authentication beyond this machine unless the config insists."""
    if config.enabled:
        return
    if is_loopback(host):
        log.info("authentication is off; only this machine can connect (bound to %s)", host)
        return
    if not config.allow_unauthenticated:
        raise ConfigError(
            f"refusing to serve without authentication on {host}: set [auth] mode to "
            '"token" or "jwt", bind to 127.0.0.1, or set [auth] allow_unauthenticated = true',
            key="auth.mode",
        )
    banner = "!" * 78
    log.warning(
        "\n%s\n!! AUTHENTICATION IS OFF and the feed listens on %s: anyone who can reach\n"
        "!! this port receives every change of every connected database.\n%s",
        banner,
        host,
        banner,
    )


# -- tokens ------------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    """The digest stored in config: SHA-256 is enough because tokens are long and random."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "feed_" + secrets.token_urlsafe(32)


# -- authenticating ----------------------------------------------------------------------------


class Authenticator:
    """Turns a Socket.IO auth payload into an Identity, or refuses with a reason."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._tokens = {t.sha256: t for t in config.tokens}
        self._jwks: dict[str, Any] | None = None
        self._jwks_url: str | None = None
        self._fetching = asyncio.Lock()
        self._fetched = -float("inf")
        """When the last fetch ended, whether it succeeded or not."""
        jwt_config = config.jwt
        if jwt_config is not None and jwt_config.jwks_file:
            self._jwks = _load_jwks_file(jwt_config.jwks_file, "auth.jwt.jwks_file")
        if jwt_config is not None and jwt_config.jwks_url:
            self._jwks_url = jwt_config.jwks_url

    async def authenticate(self, payload: Any) -> Identity:
        token = self._token(payload)
        if token is None:
            if not self.config.enabled:
                return ANONYMOUS
            raise AuthError(
                "auth_required", 'send the auth payload {"token": "<your token>"} when connecting'
            )
        static = self._tokens.get(hash_token(token))
        if static is not None:
            return Identity(static.name, static.roles, static.claims)
        if self.config.jwt is not None and token.count(".") == 2:
            return await self._jwt(token, self.config.jwt)
        if not self.config.enabled:
            raise AuthError("invalid_token", "this server does not use tokens; connect without one")
        raise AuthError("invalid_token", "the token is not valid for this server")

    def _token(self, payload: Any) -> str | None:
        if payload is None or payload == {}:
            return None
        if not isinstance(payload, dict):
            raise AuthError("bad_auth", 'the auth payload must be an object: {"token": "..."}')
        token = payload.get("token")
        if token is None:
            return None
        if not isinstance(token, str) or not token:
            raise AuthError("bad_auth", "token must be a non-empty string")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("bad_auth", f"token is longer than {MAX_TOKEN_LENGTH} characters")
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        return token

    async def _jwt(self, token: str, cfg: JwtConfig) -> Identity:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("invalid_token", "the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in cfg.algorithms:
            raise AuthError(
                "invalid_token",
                f"algorithm {str(alg)[:16]!r} is not accepted (accepted: {', '.join(cfg.algorithms)})",
            )
        key = await self._key(header, cfg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(cfg.algorithms),
                audience=list(cfg.audience) or None,
                issuer=cfg.issuer,
                leeway=self.config.leeway,
                options={"require": list(cfg.require), "verify_aud": bool(cfg.audience)},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the token has expired; get a new one") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token_not_yet_valid", "the token is not valid yet (nbf/iat)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong_audience", "the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong_issuer", "the token comes from another issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("invalid_token", f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError("invalid_token", f"the token is not valid: {exc}") from None
        for time_claim in ("exp", "nbf", "iat"):
            # PyJWT reads a numeric string as a time, but the expiry timer needs a number: a
            # token that passed with "exp": "1796..." would otherwise never be cut off.
            moment = claims.get(time_claim)
            if moment is not None and (
                not isinstance(moment, int | float) or isinstance(moment, bool)
            ):
                raise AuthError(
                    "invalid_token",
                    f"the token's {time_claim!r} claim must be a number (seconds since the epoch)",
                )
        name = _path(claims, cfg.name_claim)
        if not isinstance(name, str | int) or isinstance(name, bool) or name == "":
            raise AuthError("invalid_token", f"the token has no {cfg.name_claim!r} claim")
        roles = _roles(_path(claims, cfg.roles_claim))
        exp = claims.get("exp")
        expires = float(exp) + self.config.leeway if isinstance(exp, int | float) else None
        return Identity(str(name), roles, claims, expires, source="jwt")

    async def _key(self, header: Mapping[str, Any], cfg: JwtConfig) -> Any:
        if cfg.secret is not None:
            return cfg.secret
        import jwt

        kid = header.get("kid")
        jwks = await self._jwks_document(kid)
        candidates = [
            k for k in jwks["keys"] if isinstance(k, dict) and (kid is None or k.get("kid") == kid)
        ]
        if len(candidates) != 1:
            raise AuthError("invalid_token", "no key matches the token's kid")
        try:
            # The key's own `alg`, when it names one, must be the token's (checked by PyJWT).
            return jwt.PyJWK(candidates[0], algorithm=candidates[0].get("alg") or header.get("alg"))
        except jwt.PyJWKError as exc:
            raise AuthError("invalid_token", f"the matching key cannot be used: {exc}") from None

    async def _jwks_document(self, kid: Any) -> dict[str, Any]:
        """The key set: the file's, or the URL's, cached and refetched sparingly.

        A token with an unknown `kid` may mean the provider rotated its keys, so it triggers a
        refetch, but at most once per JWKS_REFETCH seconds: otherwise every forged token would
        cost an HTTP request to the identity provider.
        """
        if self._jwks_url is None:
            assert self._jwks is not None
            return self._jwks
        async with self._fetching:
            # Measured from the end of the last fetch: clients that queued behind a fetch that
            # failed (or took JWKS_TIMEOUT) get its outcome instead of each fetching again,
            # which had the fifth of five clients wait 25 s behind a hanging provider.
            since = time.monotonic() - self._fetched
            if self._jwks is None:
                due = since >= JWKS_RETRY
            else:
                known = kid is None or any(
                    isinstance(k, dict) and k.get("kid") == kid for k in self._jwks["keys"]
                )
                due = since > JWKS_LIFETIME or (not known and since > JWKS_REFETCH)
            if due:
                try:
                    self._jwks = await asyncio.wait_for(
                        asyncio.to_thread(fetch_jwks, self._jwks_url), JWKS_TIMEOUT
                    )
                except Exception as exc:
                    log.warning("cannot fetch the JWKS: %s", str(exc) or type(exc).__name__)
                finally:
                    self._fetched = time.monotonic()
            if self._jwks is None:
                raise AuthError("auth_unavailable", "cannot verify tokens right now; retry later")
            return self._jwks


def fetch_jwks(url: str) -> dict[str, Any]:
    """The key set at `url`, read up to MAX_JWKS_BYTES (PyJWKClient read any size into
    memory: a 50 MB answer cost the feed 150 MB)."""
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "dbfeed"}
    )
    with urllib.request.urlopen(request, timeout=JWKS_TIMEOUT) as response:
        body = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"the document is larger than {MAX_JWKS_BYTES} bytes")
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('the document has no "keys" list')
    return data


def _path(claims: Mapping[str, Any], path: str) -> Any:
    return Identity("x", claims=claims).claim(path)


def _roles(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(str(v) for v in value if isinstance(v, str | int))
    return frozenset()


def seconds_left(identity: Identity) -> float | None:
    if identity.expires_at is None:
        return None
    return max(0.0, identity.expires_at - time.time())


def check_template(template: str) -> str | None:
    """Why a row_filter template is unusable, or None (checked at config load)."""
    if not PLACEHOLDER.search(template):
        return None if _parses(template) else f"{template!r} is not a valid filter"
    if not _parses(PLACEHOLDER.sub("x", template)):
        return f"{template!r} is not a valid filter once claims are filled in"
    return None


def _parses(text: str) -> bool:
    try:
        parse_filter(text)
    except ProtocolError:
        return False
    return True
