"""ipywidgets dashboards: the leakage explorer (and the training monitor); each degrades to a static
run and figure when no widget front end is present."""
from toolkit.widgets.explorer import LeakageExplorer
from toolkit.widgets.session import DefenseOption, ExplorerSession, Outcome, Setting, Target

__all__ = ["DefenseOption", "ExplorerSession", "LeakageExplorer", "Outcome", "Setting", "Target"]
