"""Print ``ITR_CHROMIUM=<path of Playwright's Chromium>`` (for CI runners without a system
Chromium: `python scripts/chromium_path.py >> "$GITHUB_ENV"`)."""

from playwright.sync_api import sync_playwright

with sync_playwright() as p:
    print(f"ITR_CHROMIUM={p.chromium.executable_path}")
