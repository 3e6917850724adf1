"""Federated learning: FedAvg and its family, a vectorized simulation of many clients, robust
aggregation, compression, and asynchronous training. Every update crosses the Wire, and clients
train from the weights the Wire delivered to them."""
from toolkit.federated.aggregators import AGGREGATORS, make_aggregator
from toolkit.federated.clients import ClientData, RoundPlan, plan_round
from toolkit.federated.compression import COMPRESSORS, make_compressor
from toolkit.federated.config import LOSSES, FedConfig
from toolkit.federated.executors import EXECUTORS, SequentialExecutor, VectorizedExecutor, make_executor
from toolkit.federated.fedavg import FederatedAveraging
from toolkit.federated.privacy import LocalDPAccountant
from toolkit.federated.server import SERVER_OPTIMIZERS
from toolkit.federated.wire_aggregation import Aggregate, PlainSum, Uploads, WireAggregator

__all__ = ["AGGREGATORS", "COMPRESSORS", "ClientData", "EXECUTORS", "FedConfig", "FederatedAveraging", "LOSSES", "LocalDPAccountant",
           "RoundPlan", "SERVER_OPTIMIZERS", "SequentialExecutor", "VectorizedExecutor", "make_aggregator",
           "make_compressor", "make_executor", "plan_round", "Aggregate", "PlainSum", "Uploads", "WireAggregator"]
