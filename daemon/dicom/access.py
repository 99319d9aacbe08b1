"""Who may associate: called AE title checked, loopback by default, an allow-list for the rest."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from daemon.config import AccessConfig


class Refusal(enum.Enum):
    """Why an association request is refused (maps to A-ASSOCIATE-RJ diagnostics, PS3.8 9.3.4)."""

    CALLED_AE_NOT_RECOGNISED = "called AE title not recognised"
    CALLING_AE_NOT_RECOGNISED = "calling AE title / source address not in access.allow"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    refusal: Refusal | None = None


class AccessPolicy:
    """Decides on an association request from the peer's calling AE, called AE and address."""

    def __init__(self, config: AccessConfig, own_ae_title: str) -> None:
        self.config = config
        self.own_ae_title = own_ae_title
        self._allow = [
            (entry.ae_title, ipaddress.ip_network(entry.network, strict=False)) for entry in config.allow
        ]

    def decide(self, calling_ae: str, called_ae: str, address: str) -> Decision:
        calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
        if self.config.check_called_ae and called_ae != self.own_ae_title:
            return Decision(
                False,
                f"called AE title {called_ae!r} is not ours ({self.own_ae_title!r})",
                Refusal.CALLED_AE_NOT_RECOGNISED,
            )
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return Decision(False, f"unparseable peer address {address!r}", Refusal.CALLING_AE_NOT_RECOGNISED)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.config.allow_loopback and ip.is_loopback:
            return Decision(True, "loopback peer")
        for ae_title, network in self._allow:
            if ae_title == calling_ae and ip in network:
                return Decision(True, f"allow-list entry {ae_title}@{network}")
        return Decision(
            False,
            f"{calling_ae!r} from {ip} matches no access.allow entry",
            Refusal.CALLING_AE_NOT_RECOGNISED,
        )
