"""Traits derived from an id alone: spend scale, known devices, addresses.

The history loader and the live generator must agree on who a customer is
(which devices they own, how much they spend) even when they run with
different seeds or in different processes, so these are pure functions of
the id (and, for devices, a small index), not random draws. The numpy
versions compute the same values for whole columns.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from headrace.demo.config import COUNTRY_BY_CODE, EUR_PER_UNIT, TIER_BY_NAME

_MASK = (1 << 64) - 1


def mix64(value: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of an integer."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def mix64_array(values: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """:func:`mix64` over a column (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        result: npt.NDArray[np.uint64] = z ^ (z >> np.uint64(31))
        return result


def unit(value: int, salt: int) -> float:
    """A number in [0, 1) determined by ``value`` and ``salt``."""
    return (mix64(value * 0x100 + salt) >> 11) / float(1 << 53)


def unit_array(values: npt.NDArray[np.int64], salt: int) -> npt.NDArray[np.float64]:
    """:func:`unit` over a column."""
    hashed = mix64_array(values * np.int64(0x100) + np.int64(salt))
    result: npt.NDArray[np.float64] = (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return result


_SALT_SCALE = 1
_SALT_DEVICES = 2
_SALT_DEVICE_IP = 3


def spend_scale_cents(account_id: int, tier: str, currency: str) -> float:
    """The account's typical card ticket, in cents of its currency.

    The tier's typical ticket times a factor between 0.5 and 2 fixed by the
    account id.
    """
    factor: float = 2.0 ** (2.0 * unit(account_id, _SALT_SCALE) - 1.0)
    eur = TIER_BY_NAME[tier].spend_eur * factor
    return eur * 100.0 / EUR_PER_UNIT[currency]


def spend_scale_cents_array(
    account_ids: npt.NDArray[np.int64],
    tier_spend_eur: npt.NDArray[np.float64],
    eur_per_unit: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """:func:`spend_scale_cents` over columns (tier and currency pre-mapped)."""
    factor = np.exp2(2.0 * unit_array(account_ids, _SALT_SCALE) - 1.0)
    result: npt.NDArray[np.float64] = tier_spend_eur * factor * 100.0 / eur_per_unit
    return result


def device_count(customer_id: int) -> int:
    """How many devices (1 to 3) the customer normally logs in from."""
    return 1 + int(unit(customer_id, _SALT_DEVICES) * 3.0)


def device_count_array(customer_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """:func:`device_count` over a column."""
    result: npt.NDArray[np.int64] = 1 + (unit_array(customer_ids, _SALT_DEVICES) * 3.0).astype(
        np.int64
    )
    return result


def known_device(customer_id: int, index: int) -> str:
    """The name of the customer's ``index``-th known device."""
    return f"d{customer_id:x}-{index}"


def device_ip(customer_id: int, index: int, country: str) -> str:
    """The (fake) address the customer's known device connects from."""
    h = mix64(customer_id * 8 + index + (_SALT_DEVICE_IP << 56))
    first = COUNTRY_BY_CODE[country].ip_octet
    return f"{first}.{(h >> 16) & 255}.{(h >> 8) & 255}.{1 + h % 254}"


def device_ip_parts_array(
    customer_ids: npt.NDArray[np.int64], indexes: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The last three octets of :func:`device_ip` over columns."""
    h = mix64_array(customer_ids * np.int64(8) + indexes + np.int64(_SALT_DEVICE_IP << 56)).astype(
        np.uint64
    )
    second = ((h >> np.uint64(16)) & np.uint64(255)).astype(np.int64)
    third = ((h >> np.uint64(8)) & np.uint64(255)).astype(np.int64)
    fourth = (np.uint64(1) + h % np.uint64(254)).astype(np.int64)
    return second, third, fourth


def random_ip(bits: int, country: str) -> str:
    """An address in ``country`` from 24 random bits (for unknown devices)."""
    first = COUNTRY_BY_CODE[country].ip_octet
    return f"{first}.{(bits >> 16) & 255}.{(bits >> 8) & 255}.{1 + (bits & 255) % 254}"
