"""`imagegen worker`: one rank's WorkerWrapperBase served over gRPC, for backend "grpc".

The program opens its port at once, with the standard grpc.health.v1 service answering
NOT_SERVING, loads the model, and then answers SERVING and the DiffusionWorker service
(workers/hosts/proto/worker.proto) until SIGTERM, SIGINT or a Shutdown call. Then it takes no new
calls, lets the generation in flight finish (up to rpc_timeout_s), and exits 0. It outlives any
server that connects to it. Every call is one WorkerWrapperBase method: this module translates
messages and picks threads, nothing more.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from workers.config import OmniDiffusionConfig
from workers.data import PartialImageOutput, RunningSetIteration, StepProgress
from workers.hosts.grpc_messages import (
    CONTRACT_VERSION,
    MAX_MESSAGE_BYTES,
    output_to_proto,
    partial_to_proto,
    request_from_proto,
    running_set_iteration_to_proto,
    step_progress_to_proto,
)
from workers.hosts.proto import worker_pb2 as pb
from workers.hosts.proto import worker_pb2_grpc as pb_grpc
from workers.hosts.streaming import PipelineThread
from workers.logs import configure_logging, describe_error
from workers.runtime.rank_group import RankGroupError

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiffusionWorker"].full_name
# The kubelet's grpc probe asks for the server as a whole (""); a client may name the service.
HEALTH_SERVICE_NAMES = ("", SERVICE_NAME)
# The public worker methods ExecuteRpc may call; generation, cancellation, initialize and
# shutdown have messages of their own.
EXECUTE_RPC_METHODS = ("describe", "get_logs", "get_rank", "load_lora_adapter", "unload_lora_adapter")
# Those of them that change the pipeline: they run on its thread, between generations.
_PIPELINE_METHODS = ("load_lora_adapter", "unload_lora_adapter")
# Threads answering calls beside step mode's step_mode_room open generations: the engine's two steps
# in flight in request mode, and Cancel, GetRank and health checks, which must never wait behind them.
_SERVER_THREADS = 16
SERVER_OPTIONS = [
    # gRPC shares ports by default (SO_REUSEPORT): a second worker on a port in use must fail, not split its calls.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Ping an idle client every 10 s, and accept its pings as often as every 5 s (gRPC's default
    # is 5 minutes, and a client pinging more often is cut off), so both ends notice a dead peer.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]
# How often the worker looks whether its pipeline call has run past rpc_timeout_s.
_HANG_CHECK_INTERVAL_S = 1.0



# -- settings -------------------------------------------------------------------------------------
def rank_from_hostname(hostname: str) -> int:
    """A StatefulSet pod's ordinal: the number after the last '-' of its name (imagegen-worker-3 -> 3)."""
    _, dash, ordinal = hostname.rpartition("-")
    if not dash or not ordinal.isdigit():
        raise ValueError(
            f"--rank auto takes the rank from a StatefulSet pod's hostname, such as imagegen-worker-3, "
            f"but this host is {hostname!r}: pass --rank"
        )
    return int(ordinal)


def resolve_rank(od_config: OmniDiffusionConfig) -> int:
    rank = rank_from_hostname(socket.gethostname()) if od_config.worker_rank == "auto" else od_config.worker_rank
    if rank >= od_config.num_gpus:
        raise ValueError(f"rank {rank} is not below --num-gpus {od_config.num_gpus} (the number of ranks)")
    return rank


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_listen_settings(od_config: OmniDiffusionConfig) -> None:
    """Refuse settings that would serve the worker unprotected or half-configured."""
    if (od_config.worker_tls_cert is None) != (od_config.worker_tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    host = od_config.worker_host
    if not od_config.worker_token and not is_loopback(host) and not od_config.worker_allow_unauthenticated:
        raise ValueError(
            f"refusing to listen on {host}:{od_config.worker_port} without a worker token: set "
            "IMAGEGEN_WORKER_TOKEN (or --worker-token), or pass --allow-unauthenticated on a network you trust"
        )


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# -- auth -----------------------------------------------------------------------------------------
class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call but the health service's unless it carries ``authorization: Bearer <token>``.

    The kubelet's grpc probe sends no metadata, so health stays open; it reveals only the status.
    A refused call's message is never parsed.
    """

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(f"/{health.SERVICE_NAME}/"):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def refuse(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong worker token")

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


# -- the service ----------------------------------------------------------------------------------
class DiffusionWorkerServicer(pb_grpc.DiffusionWorkerServicer):
    """The DiffusionWorker service over one WorkerWrapperBase.

    Generate and the adapter calls run on the pipeline thread, one at a time in arrival order (the
    pipeline is not thread-safe); the other calls run on the server's threads at once, so a
    cancellation reaches a generation while it denoises.
    """

    def __init__(
        self,
        worker: Any,
        od_config: OmniDiffusionConfig,
        health_servicer: health.HealthServicer,
        request_stop: Callable[[], None],
    ):
        self._worker = worker
        self._od_config = od_config
        self._health = health_servicer
        self._request_stop = request_stop
        self._description: dict | None = None  # set once the model is loaded
        # Loading and every pipeline call run here, so that torch runs on one thread of this process.
        self._pipeline = PipelineThread(worker, od_config.cpu_threads_per_rank).start()
        self.stopping = threading.Event()
        # Set when this rank's group broke (a peer gone or hung): the worker leaves, exit code 1, so that
        # its owner starts it again and the whole group forms anew.
        self.group_broken = False
        # Generate calls whose caller's deadline passed while the pipeline still runs them: the server has
        # given up on this worker until they end.
        self._late_calls = 0
        self._health_lock = threading.Lock()
        self._reported_hung = False

    # -- state -------------------------------------------------------------------------------------
    def mark_loaded(self, description: dict) -> None:
        self._description = description
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._watch_for_hangs, name="imagegen-hang-watch", daemon=True).start()

    def _set_health(self, status: int) -> None:
        for name in HEALTH_SERVICE_NAMES:
            self._health.set(name, status)

    def _watch_for_hangs(self) -> None:
        while not self.stopping.wait(_HANG_CHECK_INTERVAL_S):
            self._refresh_health()

    def _refresh_health(self, late_calls: int = 0) -> None:
        """NOT_SERVING while a pipeline call has run past rpc_timeout_s, or past its caller's deadline: the
        server has given up on it (504) and keeps this worker aside, and an orchestrator's liveness probe
        should replace it; SERVING again once the call ends."""
        with self._health_lock:
            self._late_calls += late_calls
            started = self._pipeline.busy_since
            hung = self._late_calls > 0 or (
                started is not None and time.monotonic() - started > self._od_config.rpc_timeout_s
            )
            if hung == self._reported_hung or self.stopping.is_set():
                return
            self._reported_hung = hung
            if hung:
                logger.error("rank %d: a pipeline call has run past its caller's deadline", self._worker.rank)
            self._set_health(
                health_pb2.HealthCheckResponse.NOT_SERVING if hung else health_pb2.HealthCheckResponse.SERVING
            )

    def _require_loaded(self, context: grpc.ServicerContext) -> None:
        if self._description is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"rank {self._worker.rank} is still loading its model")

    # -- calls -------------------------------------------------------------------------------------
    def Initialize(self, request: pb.InitializeRequest, context: grpc.ServicerContext) -> pb.InitializeReply:
        self._require_loaded(context)
        return pb.InitializeReply(
            num_ranks=self._od_config.num_gpus,
            model_name=self._od_config.model_name,
            description_json=json.dumps(self._description),
            contract_version=CONTRACT_VERSION,
        )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        self._require_loaded(context)
        try:
            requests = [request_from_proto(message) for message in request.requests]
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {error}")
        finished = threading.Event()
        late = threading.Event()

        def on_rpc_end() -> None:
            # The caller went away (timed out, cancelled, disconnected): stop denoising for nobody.
            if not finished.is_set():
                self._worker.cancel([r.request_id for r in requests])
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0 and not late.is_set():
                    late.set()  # its deadline passed: the caller counts this worker as hung
                    self._refresh_health(late_calls=1)

        context.add_callback(on_rpc_end)
        try:
            for item in self._pipeline.stream("generate", (requests,), {"encode": request.encode}):
                if isinstance(item, PartialImageOutput):
                    yield pb.GenerateEvent(partial_image=partial_to_proto(item))
                elif isinstance(item, StepProgress):
                    yield pb.GenerateEvent(step_progress=step_progress_to_proto(item))
                elif isinstance(item, RunningSetIteration):
                    yield pb.GenerateEvent(running_set_iteration=running_set_iteration_to_proto(item))
                else:
                    finished.set()
                    yield pb.GenerateEvent(reply=pb.GenerateReply(outputs=[output_to_proto(o) for o in item]))
        except RankGroupError as error:
            logger.error("rank %d leaves: %s", self._worker.rank, error)
            self.group_broken = True
            self._request_stop()
            context.abort(grpc.StatusCode.UNAVAILABLE, describe_error(error))
        except Exception as error:  # noqa: BLE001 - the caller gets the message, the worker lives on
            logger.exception("rank %d: Generate failed", self._worker.rank)
            context.abort(grpc.StatusCode.UNKNOWN, describe_error(error))
        finally:
            finished.set()
            if late.is_set():
                self._refresh_health(late_calls=-1)

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelReply:
        self._worker.cancel(list(request.request_ids))
        return pb.CancelReply()

    def GetRank(self, request: pb.GetRankRequest, context: grpc.ServicerContext) -> pb.GetRankReply:
        return pb.GetRankReply(rank=self._worker.get_rank())

    def ExecuteRpc(self, request: pb.ExecuteRpcRequest, context: grpc.ServicerContext) -> pb.ExecuteRpcReply:
        if request.method not in EXECUTE_RPC_METHODS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"'{request.method}' cannot be called through ExecuteRpc; it takes {', '.join(EXECUTE_RPC_METHODS)} "
                "(Generate, Cancel, Initialize and Shutdown are RPCs of their own)",
            )
        try:
            args = json.loads(request.args_json or "[]")
            kwargs = json.loads(request.kwargs_json or "{}")
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"arguments are not JSON: {error}")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "args_json must be a JSON array and kwargs_json an object")
        self._require_loaded(context)
        try:
            if request.method in _PIPELINE_METHODS:
                result = self._pipeline.call(request.method, tuple(args), kwargs).result()
            else:
                result = getattr(self._worker, request.method)(*args, **kwargs)
            return pb.ExecuteRpcReply(result_json=json.dumps(result))
        except Exception as error:  # noqa: BLE001 - the caller gets the message, the worker lives on
            context.abort(grpc.StatusCode.UNKNOWN, describe_error(error))

    def Shutdown(self, request: pb.ShutdownRequest, context: grpc.ServicerContext) -> pb.ShutdownReply:
        logger.info("rank %d: Shutdown called", self._worker.rank)
        self._request_stop()
        return pb.ShutdownReply()

    def load(self) -> dict:
        """Load the model on the pipeline thread; its description."""
        description = self._pipeline.submit(self._worker.initialize).result()
        self._pipeline.use_step_loop()
        return description

    def close(self) -> None:
        """After the server stopped: wait for the pipeline call, then release the pipeline."""
        self.stopping.set()
        self._pipeline.submit(self._worker.shutdown)
        self._pipeline.shutdown(wait=True)


# -- the program ----------------------------------------------------------------------------------
def _credentials(od_config: OmniDiffusionConfig) -> grpc.ServerCredentials | None:
    if od_config.worker_tls_cert is None:
        return None
    return grpc.ssl_server_credentials(
        [(od_config.worker_tls_key.read_bytes(), od_config.worker_tls_cert.read_bytes())]
    )


def run_worker(od_config: OmniDiffusionConfig) -> int:
    """`imagegen worker`: serve one rank until asked to stop; 0 after a clean stop, 1 if it could not start."""
    try:
        rank = resolve_rank(od_config)
        check_listen_settings(od_config)
        credentials = _credentials(od_config)
    except (ValueError, OSError) as error:
        print(f"imagegen worker: {error}", file=sys.stderr)
        return 2
    configure_logging(od_config.log_format, f"worker{rank}")

    from workers.worker import WorkerWrapperBase

    worker = WorkerWrapperBase(rank, od_config)
    health_servicer = health.HealthServicer()
    for name in HEALTH_SERVICE_NAMES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    interceptors = [TokenInterceptor(od_config.worker_token)] if od_config.worker_token else []
    threads = ThreadPoolExecutor(od_config.step_mode_room + _SERVER_THREADS)
    server = grpc.server(threads, interceptors=interceptors, options=SERVER_OPTIONS)
    servers = [server]
    stopped = threading.Event()

    def request_stop() -> None:
        """Idempotent: take no new calls, let the one in flight finish (up to rpc_timeout_s)."""
        if stopped.is_set():
            return
        stopped.set()
        health_servicer.enter_graceful_shutdown()
        for each in servers:
            each.stop(od_config.rpc_timeout_s)

    servicer = DiffusionWorkerServicer(worker, od_config, health_servicer, request_stop)
    pb_grpc.add_DiffusionWorkerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = listen_address(od_config.worker_host, od_config.worker_port)
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
        if od_config.worker_health_port is not None:
            # Plaintext and health only: the kubelet's grpc probe can do neither TLS nor metadata.
            health_server = grpc.server(ThreadPoolExecutor(2), options=SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
            health_server.add_insecure_port(listen_address(od_config.worker_host, od_config.worker_health_port))
            servers.append(health_server)
    except RuntimeError as error:  # grpc's "Failed to bind to address"
        print(f"imagegen worker: cannot listen on {address}: {error}", file=sys.stderr)
        return 1
    for each in servers:
        each.start()
    logger.info(
        "rank %d of %d listening on %s (%s), loading %s",
        rank,
        od_config.num_gpus,
        address,
        "TLS" if credentials else "plaintext",
        od_config.model,
    )

    loading = True

    def on_signal(signum: int, _frame: Any) -> None:
        if loading:
            # Nothing in flight yet: leave now, without waiting for the pipeline thread to finish loading.
            logging.shutdown()
            os._exit(0)
        # Not in the handler itself: stopping takes locks the interrupted thread may hold.
        threading.Thread(target=request_stop, name="imagegen-stop").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        try:
            description = servicer.load()
        except Exception as error:  # noqa: BLE001 - one clear line, then exit 1
            logger.exception("rank %d could not load its model", rank)
            print(
                f"imagegen worker: rank {rank} could not load model '{od_config.model}': {describe_error(error)}",
                file=sys.stderr,
            )
            return 1
        loading = False
        servicer.mark_loaded(description)
        logger.info("rank %d serving %s", rank, description["pipeline"])
        for each in servers:
            each.wait_for_termination()
    finally:
        request_stop()
        servicer.close()
    logger.info("rank %d stopped", rank)
    return 1 if servicer.group_broken else 0
