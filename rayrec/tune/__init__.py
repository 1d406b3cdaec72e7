"""Ray Tune sweeps over any dotted config key (docs/tune.md)."""
