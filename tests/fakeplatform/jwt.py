"""Keys and JWTs of the fake platform: its RSA signing keys (cached per process), JWKs and
their RFC 7638 thumbprints as a pylti1p3 tool publishes them, JWS built by hand so a test
controls every byte (attack tokens included), and the checks Moodle 4.3's php-jwt makes on a
tool's client assertion."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# --------------------------------------------------------------------------- keys and JWTs

_KEY_LOCK = threading.Lock()
_KEY_CACHE: dict[tuple[str, int], rsa.RSAPrivateKey] = {}


def _cached_rsa_key(namespace: str, index: int) -> rsa.RSAPrivateKey:
    """2048-bit RSA keys, generated once per process per (namespace, index)."""
    with _KEY_LOCK:
        key = _KEY_CACHE.get((namespace, index))
        if key is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _KEY_CACHE[(namespace, index)] = key
        return key


def foreign_private_key() -> rsa.RSAPrivateKey:
    """An RSA key that no FakePlatform publishes: use it as ``sign_with=`` for bad signatures."""
    return _cached_rsa_key("foreign", 0)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class SigningKey:
    """One of the platform's RSA keys and its ``kid``."""

    kid: str
    private_key: rsa.RSAPrivateKey

    @classmethod
    def cached(cls, namespace: str, index: int) -> SigningKey:
        key = _cached_rsa_key(namespace, index)
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # Moodle's kids are 20 hex characters (fixtures: "6b7a862b702a73098958").
        return cls(kid=hashlib.sha256(der).hexdigest()[:20], private_key=key)

    @property
    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``)."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_jwk(self) -> dict[str, str]:
        numbers = self.private_key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": self.kid,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }


_RSA_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "RS256": hashes.SHA256,
    "RS384": hashes.SHA384,
    "RS512": hashes.SHA512,
}
_HMAC_HASHES: dict[str, Callable[..., Any]] = {
    "HS256": hashlib.sha256,
    "HS384": hashlib.sha384,
    "HS512": hashlib.sha512,
}

SignKey = rsa.RSAPrivateKey | bytes | None


def jwk_thumbprint(public_key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> str:
    """The RFC 7638 SHA-256 thumbprint of an RSA key, base64url without padding.

    This is the ``kid`` pylti1p3 puts in its client assertion header: ``Registration.get_kid()``
    imports the tool's public key PEM with jwcrypto (``JWK.from_pem``), which sets ``kid`` to
    this thumbprint. So a tool's JWKS must publish its key under this very kid.
    """
    if isinstance(public_key, rsa.RSAPrivateKey):
        public_key = public_key.public_key()
    numbers = public_key.public_numbers()
    members = {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)}
    return _b64url(hashlib.sha256(_json_bytes(members)).digest())


def tool_public_jwk(
    key: rsa.RSAPublicKey | rsa.RSAPrivateKey, kid: str | None = None
) -> dict[str, str]:
    """The public JWK a pylti1p3 tool publishes (``Registration.get_jwk``): ``kid`` defaults to
    the RFC 7638 thumbprint, ``alg`` RS256 (Moodle's php-jwt refuses keys without ``alg``)."""
    public_key = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    numbers = public_key.public_numbers()
    return {
        "kty": "RSA",
        "e": _b64url_uint(numbers.e),
        "n": _b64url_uint(numbers.n),
        "kid": kid if kid is not None else jwk_thumbprint(public_key),
        "alg": "RS256",
        "use": "sig",
    }


def encode_jwt(
    claims: Mapping[str, Any], *, alg: str, key: SignKey, header: Mapping[str, Any]
) -> str:
    """Build a compact JWS by hand, so that tests control every byte.

    ``alg`` selects how to sign (``RS256/384/512`` with an RSA private key, ``HS256/384/512``
    with ``key`` as the HMAC secret, ``none`` for an empty signature); ``header`` is written
    exactly as given, so it may even disagree with ``alg``. pyjwt is not used because it refuses
    to build the attack tokens (HMAC with a PEM public key as secret).
    """
    signing_input = f"{_b64url(_json_bytes(dict(header)))}.{_b64url(_json_bytes(dict(claims)))}"
    data = signing_input.encode("ascii")
    if alg.lower() == "none":
        signature = b""
    elif alg in _RSA_HASHES:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError(f"{alg} needs an RSA private key, got {type(key).__name__}")
        signature = key.sign(data, padding.PKCS1v15(), _RSA_HASHES[alg]())
    elif alg in _HMAC_HASHES:
        if not isinstance(key, (bytes, bytearray)):
            raise TypeError(f"{alg} needs bytes as HMAC secret, got {type(key).__name__}")
        signature = hmac.new(bytes(key), data, _HMAC_HASHES[alg]).digest()
    else:
        raise ValueError(f"unsupported alg {alg!r}")
    return f"{signing_input}.{_b64url(signature)}"


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _check_jwt(
    token: str, header: Mapping[str, Any], claims: Mapping[str, Any], keyset: Any
) -> str | None:
    """What Moodle 4.3's ``JWT::decode($jwt, JWK::parseKeySet($keyset))`` (php-jwt 6) checks:
    the keyset parses (every key needs ``alg``), the header's ``kid`` names a key whose
    ``alg`` is the header's, the RSA signature holds, and ``nbf``/``iat``/``exp`` (when present,
    no leeway). Returns php-jwt's message for the first failure, or None."""
    if not isinstance(keyset, dict) or not isinstance(keyset.get("keys"), list):
        return "JWK Set did not contain any keys"
    keys: dict[str, Mapping[str, Any]] = {}
    for index, jwk in enumerate(keyset["keys"]):
        if not isinstance(jwk, dict) or not jwk:
            return "JWK must not be empty"
        if "kty" not in jwk:
            return 'JWK must contain a "kty" parameter'
        if "alg" not in jwk:
            return 'JWK must contain an "alg" parameter'
        if jwk["kty"] == "RSA" and jwk.get("d"):
            return "RSA private keys are not supported"
        keys[str(jwk.get("kid", index))] = jwk
    if not keys:
        return "JWK Set did not contain any keys"
    alg = header.get("alg")
    if not alg:
        return "Empty algorithm"
    kid = header.get("kid")
    if not kid:
        return '"kid" empty, unable to lookup correct key'
    jwk = keys.get(str(kid))
    if jwk is None:
        return '"kid" invalid, unable to lookup correct key'
    if jwk.get("alg") != alg:
        return "Incorrect key for this algorithm"
    if alg not in _RSA_HASHES or jwk.get("kty") != "RSA":
        return "Algorithm not supported"
    try:
        public_key = rsa.RSAPublicNumbers(
            int.from_bytes(_b64url_decode(jwk["e"]), "big"),
            int.from_bytes(_b64url_decode(jwk["n"]), "big"),
        ).public_key()
        signing_input, _, signature = token.rpartition(".")
        public_key.verify(
            _b64url_decode(signature),
            signing_input.encode("ascii"),
            padding.PKCS1v15(),
            _RSA_HASHES[alg](),
        )
    except (KeyError, ValueError, TypeError):
        return "Signature verification failed (malformed key or signature)"
    except InvalidSignature:
        return "Signature verification failed"
    now = int(time.time())
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if isinstance(value, (int, float)) and value > now:
            return f"Cannot handle token with {name} prior to {int(value)} (now {now})"
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and now >= exp:
        return "Expired token"
    return None
