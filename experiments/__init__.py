"""The paper's claims at small scale (README.md here). A package so that the tests import each script's core as
experiments.<name>; every script still runs as `python experiments/<name>.py`."""
