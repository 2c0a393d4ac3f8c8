"""Issue 12's targets, checked by `make compare` and `make report`: Triton's throughput over the naive
baseline, the best peer and the in-process ceiling, and each one's verdict from a side-by-side result."""

from __future__ import annotations

TARGETS = {"baseline": 6.0, "peer": 1.5, "ceiling": 0.8}  # Triton's throughput over each, at least
PEER_NAMES = ("ray serve", "bentoml")


def verdicts(r: dict) -> list[str]:
    """Each target met or missed, by how much, from the medians of the per-round ratios and the p99s."""
    first, s, ratios = r["targets"][0]["name"], r["summary"], r["throughput_ratios"]
    out = []

    def check(what: str, other: str, target: float, p99: bool) -> None:
        ratio = ratios[f"{first} / {other}"]["median"]
        line = f"{first} / {what}: {ratio:.2f}× (target ≥ {target:g}×: " + \
            ("met" if ratio >= target else f"missed by {100 * (1 - ratio / target):.0f}%") + ")"
        if p99:
            mine, theirs = s[first]["p99_ms"]["median"], s[other]["p99_ms"]["median"]
            line += f"; p99 {mine:g} ms vs {theirs:g} ms ({'lower' if mine < theirs else 'NOT lower'})"
        out.append(line)

    if "baseline" in s:
        check("baseline", "baseline", TARGETS["baseline"], True)
    peers = [n for n in PEER_NAMES if n in s]
    if peers:
        best = max(peers, key=lambda n: s[n]["images_per_s"]["median"])
        check(f"best peer ({best})", best, TARGETS["peer"], True)
    if "in-process ceiling" in s:
        check("in-process ceiling", "in-process ceiling", TARGETS["ceiling"], False)
    return out
