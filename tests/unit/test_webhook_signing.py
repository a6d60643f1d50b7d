"""Webhook signatures as a receiver checks them, the derived secrets, and the retry backoff:
pure functions, no database."""

from __future__ import annotations

import hashlib
import hmac
from uuid import UUID, uuid4

from services.goals.webhooks import backoff, sign, subscription_secret, verify_signature

SECRET = "whsec_test-secret"
BODY = b'{"deliveryId":"goals:42","subscriptionId":"x","event":{}}'
NOW = 1_800_000_000


def test_the_signature_is_the_documented_hmac_of_timestamp_dot_body() -> None:
    """A receiver in any language follows the recipe in the module's docstring: HMAC-SHA256
    keyed with the secret's UTF-8 bytes over `<t>.<body>`, in hex."""
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, NOW) == f"t={NOW},v1={expected}"


def test_a_signature_verifies_only_for_its_body_secret_and_time() -> None:
    header = sign(SECRET, BODY, NOW)
    assert verify_signature(SECRET, header, BODY, now=NOW + 10)
    assert not verify_signature(SECRET, header, BODY + b" ", now=NOW)
    assert not verify_signature(SECRET, header, BODY.replace(b"42", b"43"), now=NOW)
    assert not verify_signature("whsec_other", header, BODY, now=NOW)
    # Too old or from too far ahead: a replayed delivery is refused.
    assert not verify_signature(SECRET, header, BODY, now=NOW + 301)
    assert not verify_signature(SECRET, header, BODY, now=NOW - 301)
    assert verify_signature(SECRET, header, BODY, now=NOW + 3600, tolerance=3601)


def test_any_of_several_v1_signatures_may_match() -> None:
    """Room for a secret rotation: a header may carry one signature per secret."""
    good = sign(SECRET, BODY, NOW).split(",")[1]
    assert verify_signature(SECRET, f"t={NOW},v1={'0' * 64},{good}", BODY, now=NOW)


def test_malformed_headers_never_verify() -> None:
    mac = sign(SECRET, BODY, NOW).split("v1=")[1]
    for header in ["", "garbage", f"v1={mac}", f"t={NOW}", f"t=abc,v1={mac}", f"t={NOW},v2={mac}", f"t=-{NOW},v1={mac}"]:
        assert not verify_signature(SECRET, header, BODY, now=NOW), header


def test_secrets_are_derived_per_subscription_and_key() -> None:
    a, b = uuid4(), uuid4()
    key = b"server-key"
    assert subscription_secret(key, a) == subscription_secret(key, a)
    assert subscription_secret(key, a) != subscription_secret(key, b)
    assert subscription_secret(b"another-key", a) != subscription_secret(key, a)
    secret = subscription_secret(key, UUID(int=0))
    assert secret.startswith("whsec_") and len(secret) > 40 and "server-key" not in secret


def test_backoff_doubles_up_to_its_ceiling() -> None:
    assert [backoff(n, 1.0, 10.0) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff(10_000, 0.5, 600.0) == 600.0
