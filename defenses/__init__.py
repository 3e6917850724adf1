"""Defenses, in three shapes: loss terms (e.g. NoPeek), wire transforms (e.g. activation noise), and
aggregator or trainer wrappers (secure aggregation, differential privacy).

Defense families arrive one file each.
"""
