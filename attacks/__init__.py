"""Attacks on split and federated learning. Each reads only a transcript of what its party received
(``wire.observed(by=...)``) plus the knowledge its threat model grants, and returns an AttackResult.

Attack families arrive one file each (model inversion, gradient reconstruction, label leakage).
"""
