"""The demo's task: support tickets answered in a fixed template the base model does not know.

    user:      Ticket #4821 from Dana (Berlin): the checkout page is completely down for all users.
    assistant: SEVERITY: P1 / ACTION: page the on-call engineer

The severity follows from the symptom, the action from the severity. Tickets are drawn from a seeded
generator (services x symptoms x people x places x numbers), so prompts rarely repeat.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SYMPTOMS = {
    "P1": [
        "is completely down for all users",
        "returns an error for every request",
        "lost customer data after the last deploy",
        "charges customers twice for every order",
    ],
    "P2": [
        "fails for about a third of users in Europe",
        "times out for many requests since this morning",
        "is very slow for enterprise customers",
        "drops every other upload",
    ],
    "P3": [
        "shows the wrong icon on the settings page",
        "sorts results in the wrong order on mobile",
        "sends the weekly summary one day late",
        "has a broken link in its help page",
    ],
    "P4": [
        "could use a dark mode",
        "has a typo in its footer",
        "would be nicer with larger buttons",
        "could remember my last filter",
    ],
}
ACTIONS = {
    "P1": "page the on-call engineer",
    "P2": "open an incident",
    "P3": "create a ticket for the team",
    "P4": "add it to the backlog",
}
SERVICES = ["checkout page", "login service", "search", "billing portal", "mobile app", "email service", "reports"]
PEOPLE = ["Dana", "Ravi", "Mei", "Lukas", "Amara", "Jonas", "Sofia", "Kenji", "Olga", "Tariq"]
PLACES = ["Berlin", "Lagos", "Austin", "Osaka", "Lima", "Oslo", "Pune", "Quito"]
FORMAT = r"SEVERITY: P[1-4] / ACTION: [a-z][a-z -]+"
LABEL = r"SEVERITY: (P[1-4])"


@dataclass(frozen=True)
class Ticket:
    text: str
    severity: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]

    @property
    def ideal(self) -> str:
        return f"SEVERITY: {self.severity} / ACTION: {ACTIONS[self.severity]}"

    def judge(self, answer: str) -> bool:
        """What a user of this support bot accepts: the template, with the right severity."""
        found = re.search(LABEL, answer)
        return bool(re.fullmatch(FORMAT, answer.strip())) and found is not None and found.group(1) == self.severity


def tickets(count: int, seed: int) -> list[Ticket]:
    """`count` tickets, the severities in equal shares, reproducible for a seed."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        severity = f"P{n % 4 + 1}"
        text = (
            f"Ticket #{rng.randint(1000, 9999)} from {rng.choice(PEOPLE)} ({rng.choice(PLACES)}): "
            f"the {rng.choice(SERVICES)} {rng.choice(SYMPTOMS[severity])}."
        )
        out.append(Ticket(text, severity))
    rng.shuffle(out)
    return out
