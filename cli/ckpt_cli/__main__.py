"""`python -m ckpt_cli`: the same as the `ckpt` console script."""

from __future__ import annotations

from ckpt_cli.main import main

raise SystemExit(main())
