"""``frcnn serve MODEL``: serve a deployed model on Triton Inference Server (PyTriton) until SIGINT / SIGTERM.

    frcnn serve model.onnx --http-port 8000 --grpc-port 8001 --max-batch 8 --instances 2
    # clients: Detector("http://127.0.0.1:8000/frcnn") / Detector("grpc://127.0.0.1:8001/frcnn"),
    #          or send encoded JPEG/PNG bytes to model "frcnn_image"

The Detector runs in this process; PyTriton's tritonserver (a child process) handles HTTP / gRPC, dynamic
batching and statistics. SIGINT / SIGTERM stop the server and its children (PyTriton waits at most
``exit_timeout_secs`` = 5 s for in-flight requests).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from frcnn.runtime.backends import LOW_MEMORY_HELP, low_memory_options
from frcnn.runtime.errors import UserError


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    from frcnn.runtime.backends.triton import is_url
    from frcnn.runtime.detector import Detector
    from frcnn.runtime.serving.pytriton_server import ServeOptions, build_server, import_pytriton

    if is_url(args.model):
        raise UserError(f"{args.model!r} is a server URL; `frcnn serve` needs a local .onnx or .engine file")
    ports = [args.http_port, args.grpc_port, args.metrics_port]
    if len(set(ports)) != 3:
        raise UserError(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
    memory = low_memory_options([args.model], "auto", args.low_memory)
    import_pytriton()  # fail on a missing extra before loading the model
    detector = Detector(args.model, input_format="RGB", **memory)
    if args.max_batch is not None and args.max_batch > detector.max_batch:
        raise UserError(f"--max-batch {args.max_batch} exceeds the model's max batch {detector.max_batch}")
    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, max_batch=args.max_batch or detector.max_batch,
                           instances=args.instances, max_queue_delay_us=args.max_queue_delay_us)  # fmt: skip
    server = build_server(detector, options)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.run()
        print(f"serving {args.model} on http://{args.host}:{args.http_port}/frcnn and "
              f"grpc://{args.host}:{args.grpc_port}/frcnn (encoded images: model frcnn_image); "
              "Ctrl-C or SIGTERM stops", flush=True)  # fmt: skip
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        detector.close()
    print("server stopped", file=sys.stderr, flush=True)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="serve a deployed model on Triton Inference Server (PyTriton)",
                                   description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("model", metavar="MODEL", help="deployed model: .onnx, or .engine / .plan (TensorRT)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--http-port", type=_port, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=_port, default=8001, help="gRPC port (default 8001)")
    parser.add_argument("--metrics-port", type=_port, default=8002, help="Prometheus metrics port (default 8002)")
    parser.add_argument("--max-batch", type=_positive, default=None,
                        help="largest dynamic batch (default: the model's max batch)")
    parser.add_argument("--low-memory", action="store_true", help=LOW_MEMORY_HELP)
    parser.add_argument("--instances", type=_positive, default=1, help="model instances (default 1)")
    parser.add_argument("--max-queue-delay-us", type=_non_negative, default=2000,
                        help="how long the batcher waits to fill a batch, microseconds (default 2000)")
    parser.set_defaults(func=run_serve)
    return parser
