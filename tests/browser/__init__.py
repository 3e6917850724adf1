"""Browser tests: JupyterLab and Voila in Debian's chromium, driven by Playwright."""
