"""The service behind `rkmqtt run` (main thread): wires the engine, the scheduler, admission, the MQTT
bridge and its sink, the HTTP server, the embedded broker and the health file; checks the broker and
binds the HTTP port before the model loads; takes up the journal before connecting; shuts them down
in order (its threads: docs/architecture.md, "Threads")."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from rkmqtt import __version__
from rkmqtt.engines import create_engine, resolve_engine_name
from rkmqtt.engines.base import Engine
from rkmqtt.errors import ConfigError, RkmqttError
from rkmqtt.mqtt.bridge import Bridge, CredentialsProvider
from rkmqtt.mqtt.broker import Mosquitto, port_answers
from rkmqtt.mqtt.journal import Journal, journal_path, legacy_journal_path
from rkmqtt.mqtt.link import Link
from rkmqtt.mqtt.outbox import Outbox
from rkmqtt.mqtt.reach import reach_broker
from rkmqtt.mqtt.replies import Replies, in_journal
from rkmqtt.mqtt.sink import MqttSink
from rkmqtt.protocol import Info, Limits, PullStatus
from rkmqtt.sched.admission import Admission
from rkmqtt.sched.finals import Finals
from rkmqtt.sched.lineup import Lineup
from rkmqtt.sched.loop import ModelsState, Scheduler, SchedulerConfig
from rkmqtt.sched.policy import CoreConfig
from rkmqtt.sched.request import Request
from rkmqtt.sched.residency import ResidencyConfig
from rkmqtt.settings import Settings, with_model_defaults
from rkmqtt.topics import Topics

if TYPE_CHECKING:
    from rkmqtt.http.server import HttpServer
    from rkmqtt.models.catalog import Catalog
    from rkmqtt.models.pull import PullProgress

_LOGGER = logging.getLogger(__name__)

#: Where `rkmqtt run` looks for a broker when none is set, and starts its private one if none answers.
EMBEDDED_PORT = 1883

# Another run of this node took over: a supervisor should not start this one again (systemd:
# RestartPreventExitStatus=3), or the two would take the node from each other in turn.
EXIT_TAKEN_OVER = 3


class Service:
    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        credentials_provider: CredentialsProvider | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.credentials_provider = credentials_provider
        self.embedded: Mosquitto | None = None
        self.scheduler: Scheduler | None = None
        self.bridge: Bridge | None = None
        self.journal: Journal | None = None
        self.http: HttpServer | None = None
        self._http_sockets: list[socket.socket] = []  # bound before the model loads
        self.link: Link | None = None
        self.info: Info | None = None
        self._stop_requested = threading.Event()
        self._health_thread: threading.Thread | None = None
        self._stopped = False
        self.catalog: Catalog | None = None  # numpy and rkllm: the models by name
        self._preload: str | None = None  # the first model, when it must be pulled before it loads
        self._sink: MqttSink | None = None
        self._pull_topic: str | None = None
        self._pull_mark: tuple[object, ...] | None = None
        self._first_settled = threading.Event()  # the first model is loaded, or failed
        self._first_problem: str | None = None  # why the first model cannot be had

    # -- start ------------------------------------------------------------------------------
    def _ensure_broker(self) -> None:
        s = self.settings
        if s.broker is not None:
            return
        port = EMBEDDED_PORT
        if port_answers("127.0.0.1", port):
            _LOGGER.info("no broker set: using the one on localhost:%d", port)
            self.settings = s.model_copy(update={"broker": f"mqtt://127.0.0.1:{port}"})
            return
        if not s.embedded_broker:
            raise ConfigError(f"no broker set and none answers on localhost:{port}: set broker=mqtt://host:port")
        # Persistence on: the bridge's session, and the requests queued in it, survive a restart.
        # Its own session: Ctrl-C reaches rkmqtt, which stops the broker after its last replies.
        broker_dir = s.effective_state_dir() / "mosquitto"
        self.embedded = Mosquitto(port=port, workdir=broker_dir, persistence=True, own_session=True).start()
        assert self.embedded.proc is not None
        _LOGGER.warning(
            "no broker set and none on localhost:%d: started a private Mosquitto (pid %d) on "
            "127.0.0.1:%d; it stops when rkmqtt stops",
            port,
            self.embedded.proc.pid,
            port,
        )
        self.settings = s.model_copy(update={"broker": self.embedded.url})

    def _build_info(self, engine: Engine | None, name: str, models: list[str], n_batch: int, continuous: bool) -> Info:
        einfo = engine.info() if engine is not None else {}
        return Info(
            version=__version__,
            node=self.settings.effective_node_name(),
            host=socket.gethostname(),
            started=round(time.time(), 3),
            instance=os.urandom(6).hex(),
            engine=engine.capabilities.name if engine is not None else resolve_engine_name(self.settings),
            model=name,
            n_batch=engine.capabilities.max_batch if engine is not None else n_batch,
            batching="continuous" if continuous else "static",
            runtime_version=einfo.get("runtime_version"),
            driver_version=einfo.get("driver_version"),
            limits=Limits(**self.settings.limits()),
            engine_info=einfo,
            models=models,
        )

    def _check_broker(self) -> None:
        """Say at once, in one line, when the broker does not answer (the bridge keeps trying once
        the model is loaded): not after a model load of half a minute."""
        self.link = Link(str(self.settings.broker_url))
        reach = reach_broker(self.settings)
        if not reach.ok:
            self.link.failed(reach.detail)

    def _bind_http(self) -> None:
        """Bind the HTTP port now: a busy one stops start-up before the model loads."""
        s = self.settings
        if s.http_listen is None or s.http_address is None:
            return
        from rkmqtt.http.listen import open_listeners

        self._http_sockets = open_listeners(s.http_listen, *s.http_address)

    def _open_journal(self) -> None:
        """Open (and lock) the journal now: one that another process holds stops start-up at once."""
        s = self.settings
        if not s.journal:
            return
        state, client_id, addr = s.effective_state_dir(), s.effective_client_id(), s.broker_url
        path = journal_path(state, client_id, s.topic_prefix, f"{addr.host}:{addr.port}")
        legacy = legacy_journal_path(state, client_id)
        self.journal = Journal(path, s.dedup_window, int(s.journal_max_mb * 2**20), legacy=legacy)
        self.journal.prune()

    def _load_one(self) -> tuple[Lineup, int, bool]:
        """The one engine of engine openai, a custom engine or the tests' (loaded here: a failure ends
        the start-up with one line)."""
        s = self.settings
        if self.engine is None:
            self.engine = create_engine(s)
        _LOGGER.info("loading model %s (engine %s)…", self.engine.model_name, self.engine.capabilities.name)
        t0 = time.monotonic()
        self.engine.load()
        _LOGGER.info(
            "model %s loaded in %.1f s: engine %s, n_batch %d",
            self.engine.model_name,
            time.monotonic() - t0,
            self.engine.capabilities.name,
            self.engine.capabilities.max_batch,
        )
        # What no flag, variable, file or option set takes the model's own default, if it has one
        # (SmolLM2-135M answers best greedy: at 0.7 it often answers in garbled French).
        self.settings = with_model_defaults(s, self.engine.recommended_sampling)
        if self.settings is not s:
            s = self.settings
            _LOGGER.info("sampling defaults of %s: temperature %g, repeat penalty %g", self.engine.model_name,
                         s.temperature, s.repeat_penalty)  # fmt: skip
        caps = self.engine.capabilities
        self.info = self._build_info(self.engine, self.engine.model_name, [self.engine.model_name], 0, caps.continuous)
        self._first_settled.set()
        return Lineup.single(self.engine.model_name, self.engine), caps.max_batch, caps.continuous

    def _load_models(self, engine_name: str) -> tuple[Lineup, int, bool]:
        """numpy and rkllm: models by name, loaded on first use; the first is loaded now when it is here,
        else pulled and loaded in the background while the bridge goes online. A model that cannot be
        had leaves the bridge online, saying why (stats, Home Assistant's engine connectivity), instead
        of a restart loop."""
        from rkmqtt.models.catalog import Catalog, needs_pull
        from rkmqtt.models.pull import LogProgress

        s = self.settings
        log_progress = LogProgress()

        def progress(p: PullProgress) -> None:
            log_progress(p)
            self._pull_status(p)

        self.catalog = catalog = Catalog.for_settings(s, engine_name, progress)
        first = catalog.find(None)
        engines: dict[str, Engine] = {}
        failed: dict[str, str] = {}
        if not needs_pull(catalog, first):
            try:
                engines[first.name] = catalog.open(first.name)
            except RkmqttError as e:
                failed[first.name] = self._first_problem = str(e)
                _LOGGER.error("model %s cannot be had: %s; the bridge stays online, saying so", first.name, e)
            self._first_settled.set()
        else:
            self._preload = first.name
            _LOGGER.info(
                "model %s is not here yet: pulling %s into %s while the bridge goes online (its requests wait)",
                first.name,
                first.reference,
                s.effective_models_dir(),
            )
        entry = first.entry
        n_batch = entry.n_batch if entry is not None and entry.n_batch is not None else s.n_batch
        continuous = engine_name == "numpy"
        models = [m.name for m in catalog.configured()]
        self.info = self._build_info(engines.get(first.name), first.name, models, n_batch, continuous)
        lineup = Lineup(
            ResidencyConfig(max_loaded=s.max_loaded_models, keep_alive_s=s.keep_alive_s()),
            catalog,
            engines,
            failed,
        )
        return lineup, n_batch, continuous

    def _pull_status(self, p: PullProgress) -> None:
        """A download's progress as the retained `P/node/<node>/pull` (Home Assistant's sensor): at
        each change of status and whole percent."""
        sink, topic = self._sink, self._pull_topic
        pct = p.percent
        mark = (p.reference, p.file, p.status, None if pct is None else int(pct))
        if sink is None or topic is None or mark == self._pull_mark:
            return
        self._pull_mark = mark
        sink.pull(
            PullStatus(
                reference=p.reference,
                status=p.status,
                file=p.file,
                completed=p.completed,
                total=p.total,
                percent=None if pct is None else round(pct, 1),
                message=p.message,
            ),
            topic,
        )

    def _models_changed(self, state: ModelsState) -> None:
        """A model loaded, unloaded or failed (scheduler thread): the info says what the first one is."""
        bridge, info = self.bridge, self.info
        if bridge is None or info is None:
            return
        engine = state.engines.get(info.model)
        if not self._first_settled.is_set() and (engine is not None or info.model in state.failures):
            self._first_problem = state.failures.get(info.model) if engine is None else None
            self._first_settled.set()  # the ready line (or why not) can go out
        if engine is not None:
            einfo = engine.info()
            bridge.update_info(
                engine_info=einfo,
                runtime_version=einfo.get("runtime_version"),
                driver_version=einfo.get("driver_version"),
                n_batch=engine.capabilities.max_batch,
            )

    def first_model(self) -> tuple[bool, str | None]:
        """(settled, problem): whether the first model is loaded or has failed (not while it is pulled
        or loaded in the background), and why it cannot be had (None: it is loaded). Any thread."""
        return self._first_settled.is_set(), self._first_problem

    def start(self) -> None:
        """Start in the order a user can act on: the broker (answers or not), the HTTP port, the
        journal, the model (or, one still to pull, its download in the background), then the bridge,
        which says `online` once it takes requests."""
        self._ensure_broker()
        self._check_broker()
        self._bind_http()
        self._open_journal()
        s = self.settings
        engine_name = None if self.engine is not None else resolve_engine_name(s)
        if engine_name in ("numpy", "rkllm"):
            lineup, n_batch, continuous = self._load_models(engine_name)
        else:
            lineup, n_batch, continuous = self._load_one()
        s = self.settings
        assert self.info is not None
        topics = Topics(s.topic_prefix, s.effective_node_name())
        finals = Finals(self.info.model, s.effective_node_name())
        outbox = Outbox(s.outgoing_queue, s.outgoing_queue_bytes)
        sink = MqttSink(outbox, Replies(finals), self.journal, topics.stats)
        self._sink, self._pull_topic = sink, topics.pull
        self.scheduler = Scheduler(
            lineup,
            SchedulerConfig(
                core=CoreConfig(
                    n_batch=n_batch,
                    continuous=continuous,
                    max_queue=s.max_queue,
                    batch_window_s=s.batch_window_ms / 1000.0,
                    dedup_window_s=s.dedup_window,
                ),
                stats_interval_s=s.stats_interval,
                strict_tools=s.strict_tools,
            ),
            on_stats=sink.stats,
            on_models=self._models_changed,
        )
        # One admission for both doors: a client's rate is one budget over MQTT and HTTP.
        if self.catalog is not None:
            admission = Admission(s, self.scheduler.refused, models=self.catalog)
        else:
            assert self.engine is not None
            admission = Admission(s, self.scheduler.refused, self.engine.model_name, self.engine.capabilities.tools)
        retained, extra_subs = self._homeassistant()
        self.bridge = Bridge(
            s,
            self.scheduler,
            admission,
            sink,
            self.info,
            retained_extra=retained,
            extra_subscriptions=extra_subs,
            credentials_provider=self.credentials_provider,
            link=self.link,
        )
        self.scheduler.start()
        if self._preload is not None:
            self.scheduler.preload(self._preload)
        self.bridge.take_up()
        self.bridge.start()
        if s.http_listen is not None:
            from rkmqtt.http.server import HttpServer

            tools = self.engine.capabilities.tools if self.engine is not None else False
            sockets, self._http_sockets = self._http_sockets, []
            self.http = HttpServer(
                s, self.scheduler, admission, finals, self.info, tools, self.catalog, sockets or None
            )
            self.http.start()
        if s.health_file is not None:
            self._health_thread = threading.Thread(target=self._health_loop, name="rkmqtt-health", daemon=True)
            self._health_thread.start()

    def _homeassistant(self) -> tuple[Any, dict[str, Any]]:
        s = self.settings
        if self.info is None:
            return None, {}
        from rkmqtt.mqtt import discovery

        info = self.info

        def retained() -> list[tuple[str, bytes]]:
            # With discovery off: the empty config, which removes a device an earlier run announced.
            return discovery.discovery_messages(s, info)

        if not s.discovery:
            return retained, {}

        def on_ha_status(payload: bytes) -> None:
            if payload.strip() == b"online" and self.bridge is not None:
                _LOGGER.info("Home Assistant came online: discovery published again")
                self.bridge.publish_retained_extra()

        return retained, {discovery.ha_status_topic(s): on_ha_status}

    # -- health -----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        sched, bridge = self.scheduler, self.bridge
        return {
            "pid": os.getpid(),
            "connected": bool(bridge and bridge.connected),
            "heartbeat": sched.heartbeat if sched else 0.0,
            "engine_stalled_s": round(sched.engine_stalled_s(), 1) if sched else 0.0,
            "queue_depth": sched.queue_depth if sched else 0,
            "active": sched.active if sched else 0,
            "engine_problem": sched.engine_problem if sched else None,
            "updated": time.time(),
        }

    def _health_loop(self) -> None:
        while not self._stop_requested.wait(1.0):
            self._write_health(self.health())

    def _write_health(self, data: dict[str, Any]) -> None:
        path = self.settings.health_file
        assert path is not None
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError as e:
            _LOGGER.warning("cannot write health file %s: %s", path, e)

    # -- stop -------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        """`stop` has been called."""
        return self._stopped

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking requests, let running ones finish within the grace period, answer the
        rest `shutting_down`, publish `offline`, release everything."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()
        grace = self.settings.grace_period if grace_s is None else grace_s
        bridge, scheduler, http = self.bridge, self.scheduler, self.http
        # Each step is best-effort: one failing must not keep the others (offline, the private
        # broker's exit) from happening.
        steps: list[tuple[str, Callable[[], object]]] = []
        if bridge is not None:
            steps.append(("stop taking requests", bridge.stop_accepting))
        if http is not None:
            steps.append(("stop taking HTTP requests", http.stop_accepting))
        if scheduler is not None:
            # Alone, the waiting MQTT requests stay in the journal for the next start; with other
            # nodes online they are answered `shutting_down`, and their devices' retries go there.
            # (Asked once the bridge has stopped taking requests: it knows then whether it was alone.)
            steps.append(("answer or finish requests", lambda: _drain(scheduler, grace, self._kept())))
        if http is not None:
            steps.append(("finish HTTP responses", http.stop))
        if bridge is not None:
            steps.append(("flush replies and disconnect", bridge.stop))
        if self.journal is not None:
            steps.append(("close the journal", self.journal.close))
        if scheduler is not None:
            steps.append(("release the engines", scheduler.close_engines))
        elif self.engine is not None:
            steps.append(("release the engine", self.engine.close))
        if self._http_sockets:  # bound, but start-up stopped before the server took them
            from rkmqtt.http.listen import close_all

            steps.append(("close the HTTP port", lambda: close_all(self._http_sockets)))
        if self.embedded is not None:
            steps.append(("stop the private Mosquitto", self.embedded.close))
        for what, step in steps:
            try:
                step()
            except Exception:
                _LOGGER.exception("shutdown: could not %s", what)
        if self._health_thread is not None:
            # Unhealthy at once, not after the file's max age: a stopped service serves nobody.
            self._health_thread.join(5)
            self._write_health({**self.health(), "connected": False, "stopped": True})
        _LOGGER.info("stopped")

    def _kept(self) -> Callable[[Request], bool] | None:
        return in_journal if self.bridge is not None and self.bridge.keeps_waiting else None

    def run_forever(self, on_ready: Callable[[Service], None] | None = None) -> int:
        """Run until SIGTERM or SIGINT, then stop cleanly. Returns the exit status (0).
        `on_ready` is called once, when the bridge first says `online` with its first model loaded
        (or failed: `first_model` says why)."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            _LOGGER.info("%s received: stopping", signal.Signals(signum).name)
            self._stop_requested.set()

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        status = 0
        try:
            self.start()
            ready = on_ready is None
            while not self._stop_requested.wait(0.2 if not ready else 0.5):
                # Ready once online with the first model loaded (or failed: on_ready says why).
                settled = self._first_settled.is_set()
                if not ready and settled and self.bridge is not None and self.bridge.wait_connected(0):
                    ready = True
                    assert on_ready is not None
                    on_ready(self)
                if self.scheduler is not None and self.scheduler.stopped:
                    _LOGGER.error("the scheduler stopped unexpectedly; exiting so that a supervisor restarts us")
                    status = 1
                    break
                if self.bridge is not None and self.bridge.taken_over:
                    status = EXIT_TAKEN_OVER  # the bridge said why, in one line
                    break
        finally:
            self.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return status


def _drain(scheduler: Scheduler, grace_s: float, keep: Callable[[Request], bool] | None) -> None:
    scheduler.shutdown(grace_s, keep)
    scheduler.join(grace_s + 10)
