"""The memory broker: clients, the monitor of device memory, the reclaim
policy, the event log, and the thread that samples and gives memory back."""
from kvcached.broker.broker import Broker
from kvcached.broker.handle import ClientHandle
from kvcached.broker.client import ClientSpec, ReclaimVerbs, Step
from kvcached.broker.events import Event, EventKind, EventLog, Subscription
from kvcached.broker.monitor import Monitor, open_monitor
from kvcached.broker.sample import MemorySample

__all__ = ["Broker", "ClientHandle", "ClientSpec", "ReclaimVerbs", "Step", "Event", "EventKind", "EventLog",
           "Subscription", "MemorySample", "Monitor", "open_monitor"]
