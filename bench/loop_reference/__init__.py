"""A frozen copy of the sampler as it stood before issue 24's rewrite (commit 9541c97).

Only ``bench/loop_equivalence.py`` imports it, to check that the rewritten ``sample_sde`` gives the
same traces on the same seeds. The library never imports it; do not edit it.
"""
