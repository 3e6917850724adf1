"""Split learning in every configuration: vanilla, U-shaped, vertical, multi-hop, multi-task,
relay with weight hand-off, and SplitFed v1/v2. Everything between parties crosses the Wire."""
from toolkit.split.engine import MERGES, Pipeline, Segment, Task
from toolkit.split.multiclient import Relay, SplitFed
from toolkit.split.probe import Probe, probe
from toolkit.split.splitnn import SplitConfig, SplitNN

__all__ = ["MERGES", "Pipeline", "Probe", "Relay", "Segment", "SplitConfig", "SplitFed", "SplitNN", "Task", "probe"]
