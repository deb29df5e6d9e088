"""The web apps: the customer chat (`chatapp.ui.customer`) and the staff console (`chatapp.ui.staff`), served on one
server by `chatapp.ui.server`. Nothing here decides anything."""
from __future__ import annotations

from chatapp.ui.customer import build as build_customer


def build(bot):
    """The customer app alone (what a test or an embedding launches by itself)."""
    return build_customer(bot)


def build_staff(bot):
    from chatapp.ui.staff import build

    return build(bot)
