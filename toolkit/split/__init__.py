"""Split learning in every configuration: vanilla, U-shaped, vertical, multi-hop, multi-task,
relay with weight hand-off, and SplitFed v1/v2. Everything between parties crosses the Wire;
attacks and detectors act for a party through hooks on the one training loop."""
from toolkit.split.config import SplitConfig
from toolkit.split.engine import MERGES, Pipeline, Segment, Task
from toolkit.split.hooks import Hook, Hooks
from toolkit.split.multiclient import Relay, SplitFed
from toolkit.split.probe import Probe, probe
from toolkit.split.splitnn import SplitNN

__all__ = ["Hook", "Hooks", "MERGES", "Pipeline", "Probe", "Relay", "Segment", "SplitConfig", "SplitFed", "SplitNN", "Task", "probe"]
