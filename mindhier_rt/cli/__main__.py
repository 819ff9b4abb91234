"""``python -m mindhier_rt.cli`` (torchrun launches the train commands this way)."""

from mindhier_rt.cli import main

main()
