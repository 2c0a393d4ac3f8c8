"""Where perf finds the project and writes its reports: the one module every perf package shares."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REPORTS = PROJECT_ROOT / "perf" / "reports"
