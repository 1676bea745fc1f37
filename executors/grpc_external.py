"""GrpcExternalDiffusionExecutor ("grpc"): `imagegen worker` programs reached over gRPC.

Someone else runs the workers (a Kubernetes StatefulSet, compose services, a shell). The engine
finds them at ``worker_addresses``, checks at start-up that they are the ranks its own settings
describe, and then only forwards calls. The server needs no copy of the model: what it knows of
the model comes from the workers' describe(). A worker that goes away or hangs fails its calls
(503/504) and the engine sets its rank group aside; when its address answers SERVING again,
``recover_ranks`` connects to it afresh. Closing the engine only closes the channels: the workers
keep running for the next server.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from executors.base import (
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    WorkerRpcError,
    WorkerStartupError,
    check_rank_group,
)
from executors.external import HEALTH_CHECK_TIMEOUT_S, ExternalDiffusionExecutor
from workers.data import OmniDiffusionRequest, RequestOutput, group_shares
from workers.hosts.grpc_messages import (
    ENCODING_SINCE,
    MAX_MESSAGE_BYTES,
    ContractVersionError,
    check_contract_version,
    output_from_proto,
    partial_from_proto,
    request_to_proto,
    running_set_iteration_from_proto,
    step_progress_from_proto,
    without_encoding,
    worker_contract_version,
)
from workers.hosts.proto import worker_pb2 as pb
from workers.hosts.proto import worker_pb2_grpc as pb_grpc

__all__ = ["GrpcExternalDiffusionExecutor", "GrpcWorker", "expand_addresses"]

logger = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A ping every 10 s, even between calls, and 5 s for its answer: a connection that was dropped
    # silently (a node gone, a cable pulled) fails its calls instead of hanging until rpc_timeout_s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # While a worker starts, try to connect again within 2 s (gRPC's default backoff grows to 2 minutes).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
# After the first rank's deadline passes, how long to wait for the others to say whether theirs did.
_LATE_REPLIES_S = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING


def expand_addresses(entries: list[str] | None, num_ranks: int) -> list[str]:
    """The workers' addresses in rank order, each entry holding ``{rank}`` expanded over range(num_ranks)."""
    if not entries:
        raise WorkerStartupError(
            "no workers to connect to: set --worker-addresses (IMAGEGEN_WORKER_ADDRESSES) to the workers' "
            "host:port in rank order, or to one entry holding {rank}"
        )
    addresses = []
    for entry in entries:
        addresses += [entry.replace("{rank}", str(rank)) for rank in range(num_ranks)] if "{rank}" in entry else [entry]
    if len(addresses) != num_ranks:
        raise WorkerStartupError(
            f"--worker-addresses names {len(addresses)} worker(s) but --num-gpus is {num_ranks}: give one "
            "address per rank, or one entry holding {rank}"
        )
    return addresses


@dataclass(eq=False)
class GrpcWorker:
    """One rank's connection: the channel to its address, the two services on it, and the contract
    version the worker there speaks (known once it has answered Initialize)."""

    address: str
    channel: grpc.Channel
    stub: pb_grpc.DiffusionWorkerStub
    health: health_pb2_grpc.HealthStub
    contract_version: int = 1


class GrpcExternalDiffusionExecutor(ExternalDiffusionExecutor):
    """Connects to one `imagegen worker` per rank at ``od_config.worker_addresses``.

    Each rank gets only its own share of a step (the split ``generate_shard`` makes), so a step's
    input images cross the network once. Generate is a server-streaming call: the partial images
    it decodes and its step progress reach ``progress_listeners`` while it runs. ``worker_token`` is sent with every
    call; ``worker_tls_ca`` turns TLS on.
    """

    worker_handles: list[GrpcWorker]
    worker_info: list[dict]  # each rank's describe()

    def _init_executor(self) -> None:
        config = self.od_config
        self._metadata = (("authorization", f"Bearer {config.worker_token}"),) if config.worker_token else ()
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates=config.worker_tls_ca.read_bytes())
            if config.worker_tls_ca is not None
            else None
        )
        self._lock = threading.Lock()  # guards the swap of a reconnected rank's handle
        self._cancels: set[grpc.Future] = set()  # fire-and-forget Cancel calls, held until they end
        # A thread reads each open Generate stream: PIPELINE_DEPTH steps per rank in request mode, up to
        # step_mode_room in step mode.
        self._streams = ThreadPoolExecutor(
            config.num_gpus * max(4, config.step_mode_room), thread_name_prefix="imagegen-grpc"
        )
        super()._init_executor()

    # -- connecting --------------------------------------------------------------------------------
    def _open(self, address: str) -> GrpcWorker:
        if self._credentials is None:
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS)
        return GrpcWorker(address, channel, pb_grpc.DiffusionWorkerStub(channel), health_pb2_grpc.HealthStub(channel))

    def _connect_to_workers(self) -> None:
        addresses = expand_addresses(self.od_config.worker_addresses, self.od_config.num_gpus)
        self.worker_handles.extend(self._open(address) for address in addresses)
        timeout = self.od_config.worker_start_timeout_s
        deadline = time.monotonic() + timeout
        self.worker_info = []
        for rank, worker in enumerate(self.worker_handles):
            self._wait_until_serving(rank, worker, deadline, timeout)
            remaining = max(HEALTH_CHECK_TIMEOUT_S, deadline - time.monotonic())
            self.worker_info.append(self._identify(rank, worker, remaining))

    def _wait_until_serving(self, rank: int, worker: GrpcWorker, deadline: float, timeout: float) -> None:
        """Watch the worker's health until it says SERVING (it loads its model meanwhile)."""
        last = "nothing answered"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                # wait_for_ready: a worker that is not listening yet is waited for, not failed.
                watch = worker.health.Watch(health_pb2.HealthCheckRequest(), timeout=remaining, wait_for_ready=True)
                for answer in watch:
                    if answer.status == _SERVING:
                        return
                    last = f"it reports {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise WorkerStartupError(
                        f"{worker.address} (rank {rank}) has no gRPC health service: is it an imagegen worker?"
                    ) from None
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    last = f"{error.code().name}: {error.details()}"
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))  # it went away mid-watch
        raise WorkerStartupError(
            f"the worker at {worker.address} (rank {rank}) did not report SERVING within {timeout:g}s ({last})"
        )

    def _identify(self, rank: int, worker: GrpcWorker, timeout: float) -> dict:
        """Initialize, and check that the worker is the one this rank needs; returns its describe()."""
        try:
            reply = worker.stub.Initialize(pb.InitializeRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise WorkerStartupError(
                    f"the worker at {worker.address} (rank {rank}) refused the worker token: set IMAGEGEN_WORKER_TOKEN "
                    "(or --worker-token) to the token the workers were started with"
                ) from None
            raise WorkerStartupError(
                f"the worker at {worker.address} (rank {rank}) failed Initialize: "
                f"{error.code().name}: {error.details()}"
            ) from None
        description = json.loads(reply.description_json)
        worker.contract_version = worker_contract_version(reply)
        config = self.od_config
        where = f"the worker at {worker.address}"
        if description["rank"] != rank:
            raise WorkerStartupError(
                f"{where} is rank {description['rank']} but is listed at position {rank}: "
                "list the workers in rank order"
            )
        if reply.num_ranks != config.num_gpus:
            raise WorkerStartupError(
                f"{where} (rank {rank}) was started for {reply.num_ranks} ranks (--num-gpus) but this server has "
                f"{config.num_gpus}"
            )
        check_rank_group(config, description, f"{where} (rank {rank})")
        if reply.model_name != config.model_name:
            raise WorkerStartupError(
                f"{where} (rank {rank}) serves model '{reply.model_name}' but this server serves '{config.model_name}' "
                "(--model, or --served-model-name)"
            )
        others = [info for other, info in enumerate(self.worker_info) if other != rank]
        if others and description["pipeline"] != others[0]["pipeline"]:
            raise WorkerStartupError(
                f"{where} (rank {rank}) runs {description['pipeline']} but rank {others[0]['rank']} runs "
                f"{others[0]['pipeline']}"
            )
        self._set_up_rank(rank, partial(self._call_one, worker, timeout=timeout))
        return description

    def _call_one(self, worker: GrpcWorker, method: str, args: tuple, timeout: float) -> Any:
        """A unary worker method on one rank, for its set-up before it serves."""
        call, message, decode = self._unary_call(method, args, {})
        try:
            return decode(getattr(worker.stub, call)(message, timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as error:
            raise WorkerStartupError(
                f"the worker at {worker.address}: {method} failed: {error.code().name}: {error.details()}"
            ) from None

    # -- transport ---------------------------------------------------------------------------------
    def _forward_rpc_to_workers(
        self, method: str, timeout: float, args: tuple, kwargs: dict, unique_reply_rank: int | None
    ) -> Any:
        serving = self.serving_ranks()
        with self._lock:
            workers = [self.worker_handles[rank] for rank in serving]
        if method in ("generate", "generate_shard"):
            requests: list[OmniDiffusionRequest] = args[0] if args else kwargs["requests"]
            # generate_shard: each rank gets its own share; generate: every rank generates them all.
            whole = method == "generate"
            # A rank group's ranks all get the group's share: they make its images together.
            config = self.od_config
            shares = (
                [requests] * len(workers) if whole
                else [
                    group_shares(requests, config.num_rank_groups, kwargs.get("group"), kwargs.get("groups"))[
                        rank // config.rank_group_size
                    ]
                    for rank in serving
                ]
            )
            replies = self._generate(method, serving, workers, shares, timeout, kwargs.get("encode", False))
        else:
            call, message, decode = self._unary_call(method, args, kwargs)
            stubs = [getattr(worker.stub, call) for worker in workers]
            futures = [stub.future(message, timeout=timeout, metadata=self._metadata) for stub in stubs]
            replies = []
            for rank, future in zip(serving, futures):
                try:
                    replies.append(decode(future.result()))
                except grpc.RpcError as error:
                    raise self._error(rank, method, timeout, error) from None
        return replies if unique_reply_rank is None else replies[unique_reply_rank]

    def _unary_call(self, method: str, args: tuple, kwargs: dict) -> tuple[str, Any, Any]:
        """(stub method, request message, reply decoder) for a worker method other than generation."""
        if method == "initialize":
            return "Initialize", pb.InitializeRequest(), lambda reply: json.loads(reply.description_json)
        if method == "cancel":
            request_ids = args[0] if args else kwargs["request_ids"]
            return "Cancel", pb.CancelRequest(request_ids=request_ids), lambda reply: None
        if method == "shutdown":
            return "Shutdown", pb.ShutdownRequest(), lambda reply: None
        try:
            arguments = {"args_json": json.dumps(list(args)), "kwargs_json": json.dumps(kwargs)}
        except TypeError as error:
            raise WorkerRpcError(f"RPC '{method}' over gRPC takes JSON values only: {error}") from None
        return (
            "ExecuteRpc",
            pb.ExecuteRpcRequest(method=method, **arguments),
            lambda reply: json.loads(reply.result_json),
        )

    def _generate(
        self,
        method: str,
        ranks: list[int],
        workers: list[GrpcWorker],
        shares: list[list[OmniDiffusionRequest]],
        timeout: float,
        encode: bool,
    ) -> list[list[RequestOutput]]:
        """One Generate stream per rank (``ranks``, their ``workers``) with a share, read at once by a
        thread each; fails at the first rank that fails. ``encode``: the workers that can encode their images
        (contract version ENCODING_SINCE) do; older ones send pixels."""
        streams: list[grpc.Call] = []
        streams_lock = threading.Lock()

        def read(worker: GrpcWorker, share: list[OmniDiffusionRequest]) -> list[RequestOutput]:
            if not share:
                return []  # nothing for this rank in this step
            messages = [request_to_proto(r) for r in share]
            if worker.contract_version < ENCODING_SINCE:
                messages = [without_encoding(message) for message in messages]
            request = pb.GenerateRequest(requests=messages, encode=encode and worker.contract_version >= ENCODING_SINCE)
            try:
                for message in request.requests:
                    check_contract_version(message, worker.contract_version, f"the worker at {worker.address}")
            except ContractVersionError as error:
                raise WorkerRpcError(str(error)) from None
            stream = worker.stub.Generate(request, timeout=timeout, metadata=self._metadata)
            with streams_lock:
                streams.append(stream)
            for event in stream:
                if event.HasField("partial_image"):
                    self._report_progress(partial_from_proto(event.partial_image))
                elif event.HasField("step_progress"):
                    self._report_progress(step_progress_from_proto(event.step_progress))
                elif event.HasField("running_set_iteration"):
                    self._report_progress(running_set_iteration_from_proto(event.running_set_iteration))
                else:
                    return [output_from_proto(output) for output in event.reply.outputs]
            raise WorkerRpcError(f"the worker at {worker.address} ended Generate without a reply")

        futures = [self._streams.submit(read, worker, share) for worker, share in zip(workers, shares)]
        done, pending = wait_futures(futures, return_when=FIRST_EXCEPTION)
        failed = [index for index, future in enumerate(futures) if future in done and future.exception() is not None]
        if not failed:
            return [future.result() for future in futures]
        rank = ranks[failed[0]]
        error = futures[failed[0]].exception()
        if isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            # The ranks share one deadline: name every rank that missed it.
            wait_futures(pending, timeout=_LATE_REPLIES_S)
            late = tuple(r for r, f in zip(ranks, futures) if not f.done() or _timed_out(f))
            raise RpcTimeoutError(
                f"RPC '{method}' timed out after {timeout:g}s waiting for rank {', '.join(map(str, late))}", late
            ) from None
        with streams_lock:
            for stream in streams:
                stream.cancel()  # the other ranks stop denoising for a step that has failed
        if isinstance(error, grpc.RpcError):
            raise self._error(rank, method, timeout, error) from None
        raise error

    def _error(self, rank: int, method: str, timeout: float, error: grpc.RpcError) -> ExecutorError:
        """A failed call as the executor error the engine maps to an HTTP status."""
        code, details = error.code(), error.details()
        address = self.worker_handles[rank].address
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RpcTimeoutError(f"RPC '{method}' timed out after {timeout:g}s waiting for rank {rank}", (rank,))
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return WorkerDiedError(f"worker rank {rank} at {address} is unreachable: {code.name}: {details}", (rank,))
        return WorkerRpcError(f"worker rank {rank} at {address}: RPC '{method}' failed: {code.name}: {details}")

    def cancel_requests(self, request_ids: list[str]) -> None:
        message = pb.CancelRequest(request_ids=request_ids)
        for worker in list(self.worker_handles):
            # Fire and forget: a worker that is gone has nothing to cancel.
            future = worker.stub.Cancel.future(message, timeout=HEALTH_CHECK_TIMEOUT_S, metadata=self._metadata)
            self._cancels.add(future)
            future.add_done_callback(self._cancels.discard)

    # -- health --------------------------------------------------------------------------------------
    def _check_worker_health(self) -> None:
        """The gRPC health service and get_rank of every serving rank, as the guide's health monitoring does."""
        failed = self._probe(self.serving_ranks(), HEALTH_CHECK_TIMEOUT_S, also_get_rank=True)
        if failed:
            rank, reason = next(iter(failed.items()))
            raise WorkerDiedError(reason, (rank,))

    def probe_ranks(self, ranks: range, timeout: float) -> dict[int, str]:
        return self._probe(ranks, timeout)

    def _probe(self, ranks: range | list[int], timeout: float, also_get_rank: bool = False) -> dict[int, str]:
        """rank -> why, for each of ``ranks`` whose health service does not answer SERVING in ``timeout``
        (a hung pipeline reports NOT_SERVING; a stalled process or a partition does not answer)."""
        with self._lock:
            workers = {rank: self.worker_handles[rank] for rank in ranks}
        checks = {
            rank: (
                worker.health.Check.future(health_pb2.HealthCheckRequest(), timeout=timeout),
                worker.stub.GetRank.future(pb.GetRankRequest(), timeout=timeout, metadata=self._metadata)
                if also_get_rank else None,
            )
            for rank, worker in workers.items()
        }
        failed = {}
        for rank, (health, get_rank) in checks.items():
            address = workers[rank].address
            try:
                status = health.result().status
                answered = rank if get_rank is None else get_rank.result().rank
            except grpc.RpcError as error:
                failed[rank] = (
                    f"worker rank {rank} at {address} failed its health check: {error.code().name}: {error.details()}"
                )
                continue
            if status != _SERVING:
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                failed[rank] = f"worker rank {rank} at {address} reports {name}"
            elif answered != rank:
                failed[rank] = f"the worker at {address} answers as rank {answered}, expected {rank}"
        return failed

    def recover_ranks(self, ranks: range, timeout: float) -> bool:
        """When every rank of the group answers SERVING on its address: a fresh channel to each, the
        start-up checks and set-up calls (adapters), and True. The workers' owner replaces them; this
        only notices. A rank where something else answers now is logged and stays aside."""
        fresh: dict[int, tuple[GrpcWorker, dict]] = {}
        try:
            for rank in ranks:
                worker = self._open(self.worker_handles[rank].address)
                fresh[rank] = (worker, {})
                if worker.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status != _SERVING:
                    return False
                fresh[rank] = (worker, self._identify(rank, worker, max(timeout, HEALTH_CHECK_TIMEOUT_S)))
        except grpc.RpcError:
            return False  # not back yet
        except WorkerStartupError as error:
            logger.error("%s", error)
            return False
        finally:
            if any(not info for _, info in fresh.values()):
                for worker, _ in fresh.values():
                    worker.channel.close()
        with self._lock:
            olds = [self.worker_handles[rank] for rank in ranks]
            for rank, (worker, info) in fresh.items():
                self.worker_handles[rank] = worker
                self.worker_info[rank] = info
        for old in olds:
            old.channel.close()
        logger.info("worker rank %s: reconnected to %s", ", ".join(map(str, ranks)), ", ".join(o.address for o in olds))
        return True

    # -- shutdown ------------------------------------------------------------------------------------
    def _disconnect_from_workers(self) -> None:
        # The workers are not ours: close the channels, never stop them.
        handles, self.worker_handles = self.worker_handles, []
        for worker in handles:
            worker.channel.close()
        self._streams.shutdown(wait=False)


def _timed_out(future: Future) -> bool:
    error = future.exception()
    return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
