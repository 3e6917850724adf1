"""Decentralized peer-to-peer training in simulation: topologies (networkx), peer discovery,
sequential and parallel ring propagation, gossip (D-PSGD), personal layers and node failures.
Every message between peers crosses the Wire (kind ``"weights"``), so the transcript and the
attacks apply; local training is the federated executors'.

Example:
    >>> from toolkit import data, models
    >>> from toolkit.decentralized import RingTraining, topology
    >>> ds = data.load("loan", n_samples=600)
    >>> ring = RingTraining(models.tabular_mlp(8, 2), data.partition(ds, 3), topology.ring(3))
    >>> sorted({t.kind for t in ring.wire.observed()})
    ['initiator', 'register', 'roles', 'topology']
"""
from toolkit.decentralized import topology
from toolkit.decentralized.base import DecentralizedProtocol, shared_mask
from toolkit.decentralized.baseline import epochs_to_convergence, train_centralized
from toolkit.decentralized.discovery import DiscoveryServer, node_name
from toolkit.decentralized.gossip import Gossip, consensus_distance
from toolkit.decentralized.leakage import model_difference
from toolkit.decentralized.ring import ParallelRing, RingTraining
from toolkit.decentralized.topology import (TOPOLOGIES, check_topology, complete, draw, heal, line,
                                            metropolis_hastings, random_regular, ring, rings_of_rings,
                                            semi_centralized, star)

PROTOCOLS = {"ring": RingTraining, "parallel_ring": ParallelRing, "gossip": Gossip}

__all__ = ["DecentralizedProtocol", "DiscoveryServer", "Gossip", "PROTOCOLS", "ParallelRing", "RingTraining",
           "TOPOLOGIES", "check_topology", "complete", "consensus_distance", "draw", "epochs_to_convergence",
           "heal", "line", "metropolis_hastings", "model_difference", "node_name", "random_regular", "ring",
           "rings_of_rings", "semi_centralized", "shared_mask", "star", "topology", "train_centralized"]
