"""``python -m diffkit.training run.yaml``: see [`main`][diffkit.training.main]."""

from diffkit.training._run import main

raise SystemExit(main())
