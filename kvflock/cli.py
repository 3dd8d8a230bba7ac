"""The `kvflock` command line: one subcommand per entry point of the system."""

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError

from kvflock import __version__
from kvflock.shared.logs import LOG_FORMATS, setup_logging

log = logging.getLogger("kvflock.cli")  # not __name__: `python -m kvflock.cli` runs it as __main__

if TYPE_CHECKING:
    from kvflock.worker.config import EngineConfig

LOG_LEVELS = ["debug", "info", "warning", "error"]


def _port(text: str) -> int:
    """A TCP port number, refused by argparse (one line, naming the flag) outside 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {port}")
    return port


# Flag names kept from before the flags were made from EngineConfig, beside the field's own.
_FLAG_ALIASES = {"enable_prefix_caching": ("--prefix-caching",)}  # and so --no-prefix-caching


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, naming the flag (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag_type(annotation: Any) -> tuple[type, list[Any] | None]:
    """The argparse type and choices of an EngineConfig field: `X | None` as X, Literal as its choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices
    return annotation, None


def _add_engine_options(p: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()) -> None:
    """`--config FILE` and one flag per EngineConfig field (worker/config.py), named after it: its type,
    choices and help come from the field; its default and bounds stay with the model, which checks
    what was given (a flag not given is absent from the parsed arguments)."""
    from kvflock.worker.config import EngineConfig

    group = p.add_argument_group(
        "engine settings", "EngineConfig's fields; each flag given overrides the --config file's value")
    group.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="engine config file: a JSON object of these settings by field name (max_num_seqs, ...)")
    names = [name for name in EngineConfig.model_fields if name not in exclude]
    for name in names:
        field = EngineConfig.model_fields[name]
        flags = [f"--{name.replace('_', '-')}", *_FLAG_ALIASES.get(name, ())]
        kind, choices = _flag_type(field.annotation)
        text = (field.description or "").replace("%", "%%")
        if field.default is not None:
            text += f" (default: {str(field.default).lower() if kind is bool else field.default})"
        if kind is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)
        else:
            group.add_argument(*flags, dest=name, type=kind, choices=choices, default=argparse.SUPPRESS,
                               help=text)
    p.set_defaults(engine_fields=names)


def engine_config(args: argparse.Namespace) -> "EngineConfig":
    """The engine settings of a parsed `serve` or `generate` command line: the --config file's,
    overridden by the flags given."""
    from kvflock.worker.config import EngineConfig

    given = {name: getattr(args, name) for name in args.engine_fields if hasattr(args, name)}
    return EngineConfig.from_file(args.config, **given) if args.config else EngineConfig(**given)


def _add_generate(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("generate", help="answer a prompt offline with the engine")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="the sampling seed")
    p.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    _add_engine_options(p, exclude=frozenset({"seed"}))  # --seed is the requests' own seed here
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from kvflock.worker.config import SamplingParams
    from kvflock.worker.engine import LLMEngine
    from kvflock.worker.llm import LLM

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    llm = LLM.from_engine(LLMEngine(engine_config(args)))
    if args.raw:
        outputs = llm.generate(args.prompt, params)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    for out in outputs:
        print(out.outputs[0].text.strip())
    return 0


def _add_quantize(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("quantize", help="write a GPTQ-format int4/int8 or an FP8 copy of a Hugging Face checkpoint")
    p.add_argument("--model", type=Path, required=True, help="HF folder with bf16/fp16/fp32 safetensors")
    p.add_argument("--format", default="gptq", choices=["gptq", "fp8"],
                   help="gptq: int4/int8 weights (--bits); fp8: e4m3 weights, one scale per tensor, that vLLM's "
                   "fp8 method also loads")
    p.add_argument("--bits", type=int, choices=[4, 8], help="gptq: bits per weight (required)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input features per scale (default: 128 for 4 bits, -1 = per channel for 8 bits)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                   help="gptq format: round-to-nearest, or GPTQ measured on --calibration text")
    p.add_argument("--calibration", type=Path, help="--method gptq: a text file to measure the layers' inputs on")
    p.add_argument("--calibration-tokens", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--calibration-samples", type=int, default=128, help="calibration sequences at most")
    p.add_argument("--out", type=Path, required=True, help="new folder for the quantized checkpoint")
    p.add_argument("--device", default="cpu", help="where to quantize (cpu, cuda)")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from kvflock.worker.model.quantize_checkpoint import calibration_sequences, quantize_checkpoint

    if args.format == "gptq" and args.bits is None:
        raise ValueError("--bits: required with --format gptq (4 or 8)")
    if args.format == "fp8" and (args.bits not in (None, 8) or args.group_size is not None):
        raise ValueError("--bits/--group-size: --format fp8 has one scale per tensor and 8 bits; leave them out")
    if args.format == "fp8" and args.method != "rtn":
        raise ValueError("--method: gptq applies to --format gptq; --format fp8 rounds to nearest")
    if (args.method == "gptq") != (args.calibration is not None):
        raise ValueError("--calibration: give a text file with --method gptq, and only then")
    calibration = None
    if args.calibration is not None:
        if not args.calibration.is_file():
            raise ValueError(f"--calibration: {args.calibration} is not a file")
        calibration = calibration_sequences(args.model, args.calibration.read_text(), args.calibration_tokens,
                                            args.calibration_samples)
    quantize_checkpoint(args.model, args.out, args.bits, args.group_size, args.device,
                        progress=lambda line: print(line, flush=True), fmt=args.format, calibration=calibration)
    return 0


def _add_fetch_model(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("fetch-model", help="download hf://org/name@revision into a cache folder, verified")
    p.add_argument("source", help="hf://org/name[@revision] (revision: branch, tag or commit; default main)")
    p.add_argument("--cache-dir", type=Path, required=True, help="the cache folder (shared by a node's pods)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="a file holding the Hub token, for gated or private models (default: $HF_TOKEN)")
    p.add_argument("--endpoint", default=None, help="the Hub or a mirror (default: $HF_ENDPOINT, else huggingface.co)")
    p.set_defaults(func=_run_fetch_model)


def _run_fetch_model(args: argparse.Namespace) -> int:
    import os

    from kvflock.shared.hub import HubSource
    from kvflock.worker.model.hub import TOKEN_ENV, HubClient, fetch

    import httpx

    source = HubSource.parse(args.source)
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get(TOKEN_ENV)
    client = HubClient(args.endpoint, token)
    try:
        print(fetch(source, args.cache_dir, client))
    except httpx.HTTPError as exc:  # the Hub (or mirror) could not be reached or failed
        print(f"kvflock fetch-model: error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def _add_crds(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("crds", help="render the CustomResourceDefinitions into crds/")
    p.add_argument("--output-dir", default="crds", help="folder of the CRD YAML files (default: crds)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    p.set_defaults(func=_run_crds)


def _run_crds(args: argparse.Namespace) -> int:
    from kvflock.operator.render import write_crds

    stale = write_crds(args.output_dir, check=args.check)
    for path in stale:
        print(f"{path}: {'differs from the models; run `kvflock crds`' if args.check else 'written'}")
    return 1 if args.check and stale else 0


def _add_operator(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("operator", help="run the InferenceService operator (kopf)")
    p.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeat; default: all)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, else ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--probe-interval", type=float, default=5.0, help="seconds between reads of the workers' metrics")
    p.add_argument("--health-port", type=_port, default=None, help="serve /healthz for the kubelet's probes on this port")
    p.add_argument("--metrics-port", type=_port, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--peering", default=None, metavar="NAME",
                   help="elect a leader among operator replicas through this kopf peering object (a "
                        "ClusterKopfPeering, or a KopfPeering with --namespace); default: run standalone")
    p.add_argument("--peering-lifetime", type=int, default=10, metavar="SECONDS",
                   help="how long a replica's keep-alive counts: a killed leader is replaced within it (default 10)")
    p.add_argument("--shares-worker-files", action="store_true",
                   help="the workers run on this machine and see its files (the local cluster): a model path "
                        "missing here fails the service before any pod starts")
    p.add_argument("--verbose", "-v", action="count", default=0, help="more logging (-v: debug)")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only")
    p.set_defaults(func=_run_operator)


def _run_operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from kvflock.operator.runner import OperatorOptions, load_configuration, run_operator

    if args.quiet or args.verbose:  # main() configured logging from --log-level already
        logging.getLogger().setLevel(logging.WARNING if args.quiet else logging.DEBUG)
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    configuration = load_configuration(args.kubeconfig, args.context)
    if args.peering_lifetime < 2:
        raise ValueError(f"--peering-lifetime: must be at least 2 seconds, got {args.peering_lifetime}")
    options = OperatorOptions(probe_interval=args.probe_interval, peering=args.peering,
                              peering_lifetime=args.peering_lifetime, shares_worker_files=args.shares_worker_files)
    # kopf stops gracefully on SIGINT and SIGTERM.
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port is not None else None
    asyncio.run(run_operator(configuration, namespaces=args.namespace, options=options, liveness_endpoint=liveness))
    return 0


def _add_access_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key-file", default=None,
                   help="require `Authorization: Bearer <key>` on /v1/* with a key of this file (one per line; "
                        "default: $KVFLOCK_API_KEY_FILE, else no key is required)")
    p.add_argument("--internal-token-file", default=None,
                   help="the token the router shows its workers (the file's first key), which a worker then "
                        "requires instead of user keys, unless --api-key-file is given too "
                        "(default: $KVFLOCK_INTERNAL_TOKEN_FILE)")
    p.add_argument("--requests-per-minute", type=int, default=None,
                   help="per API key; more get 429 with Retry-After (default: no limit)")
    p.add_argument("--tokens-per-minute", type=int, default=None,
                   help="per API key, prompt plus max_tokens counted on arrival; more get 429 (default: no limit)")


def _add_serve(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API (one worker)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the names clients may ask for, all listed in /v1/models (default: --model)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-queued-requests", type=int, default=256, help="beyond running ones; more get 429")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    _add_access_options(p)
    p.add_argument("--admin-token-file", default=None,
                   help="require this operator token on /admin/* (default: $KVFLOCK_ADMIN_TOKEN_FILE, else open)")
    p.add_argument("--metrics-port", type=_port, default=None, help="serve /metrics on this port instead of --port")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="LoRA adapters (PEFT folders) served from the start, each under its name (needs --enable-lora)")
    p.add_argument("--lora-modules-file", default=None, metavar="FILE",
                   help="a JSON object {name: path} of more adapters loaded at start; one that fails to load is "
                        "skipped with a warning (the operator's list, which it also loads at run time)")
    _add_engine_options(p)
    p.set_defaults(func=_run_serve)


def _lora_modules(values: list[str], enabled: bool) -> dict[str, str]:
    """--lora-modules NAME=PATH ... as {name: path}."""
    modules: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"lora_modules: {value!r} is not NAME=PATH")
        if name in modules:
            raise ValueError(f"lora_modules: the name {name!r} is given twice")
        modules[name] = path
    if modules and not enabled:
        raise ValueError("lora_modules: adapters need --enable-lora")
    return modules


def _lora_modules_file(path: str | None, enabled: bool) -> dict[str, str]:
    """--lora-modules-file's {name: path} (empty without the flag)."""
    if path is None:
        return {}
    try:
        modules = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"lora_modules_file: cannot read {path}: {exc}") from None
    if not isinstance(modules, dict) or not all(isinstance(v, str) for v in modules.values()):
        raise ValueError(f"lora_modules_file: {path} must hold a JSON object of adapter name -> folder")
    if modules and not enabled:
        raise ValueError("lora_modules_file: adapters need --enable-lora")
    return modules


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvflock.shared import auth
    from kvflock.worker.async_engine import AsyncEngine
    from kvflock.worker.engine import LLMEngine
    from kvflock.worker.server import WorkerState, create_app

    if args.max_queued_requests < 0:
        raise ValueError(f"max_queued_requests: must be >= 0, got {args.max_queued_requests}")
    api_keys = auth.keys_from(args.api_key_file, auth.API_KEY_FILE_ENV)
    internal = auth.keys_from(args.internal_token_file, auth.INTERNAL_TOKEN_FILE_ENV)
    # Behind a router alone, only its internal token (user keys are refused); with both files, also
    # the users' keys: a Gateway API inference gateway's proxy calls the worker with the user's own.
    access = auth.AccessPolicy(api_keys=internal + api_keys,
                               admin_tokens=auth.keys_from(args.admin_token_file, auth.ADMIN_TOKEN_FILE_ENV),
                               requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute)
    config = engine_config(args)
    from kvflock.worker.model.tokenizer import read_chat_template

    read_chat_template(config.chat_template)  # a wrong --chat-template fails now, in one line, not in the load
    lora_modules = _lora_modules(args.lora_modules, config.enable_lora)
    names = args.served_model_name or [config.model]
    # The command line's --lora-modules win over the file's entries of the same name.
    listed = {name: path for name, path in _lora_modules_file(args.lora_modules_file, config.enable_lora).items()
              if name not in lora_modules}

    def load() -> AsyncEngine:
        engine = LLMEngine(config)
        for name, path in lora_modules.items():
            engine.load_lora(name, path)
        for name, path in listed.items():
            try:
                if name in names:
                    raise ValueError(f"lora_name: {name!r} is the base model's name")
                engine.load_lora(name, path)
            except ValueError as exc:  # the operator reports it when it loads the adapter itself
                log.warning("LoRA adapter %s from %s not loaded: %s", name, path, exc)
        engine.warm_up()
        return AsyncEngine(engine, args.max_queued_requests)

    if len(set(names)) != len(names):
        raise ValueError(f"served_model_name: each name may be given once, got {names}")
    if set(names) & set(lora_modules):
        raise ValueError(f"lora_modules: {sorted(set(names) & set(lora_modules))} also served as the base model's name")
    state = WorkerState(served_model_name=names[0], aliases=tuple(names[1:]), tool_call_parser=config.tool_call_parser)
    server: uvicorn.Server | None = None

    def stop_on_load_error() -> None:
        assert server is not None
        server.should_exit = True

    app = create_app(state, args.max_request_bytes, load=load, on_load_error=stop_on_load_error, access=access,
                     serve_metrics=args.metrics_port is None)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                                           log_level=args.log_level, log_config=None))
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, args.host, registry=state.metrics.registry)
    server.run()
    return 1 if state.load_error else 0


def _add_router(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("router", help="route OpenAI requests over an InferenceService's workers")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--worker", action="append", default=[], metavar="[POOL=]URL",
                   help="a worker's base URL, optionally in a pool (repeat); instead of --service")
    p.add_argument("--service", default=None, help="discover the workers of this InferenceService")
    p.add_argument("--namespace", "-n", default="default", help="the InferenceService's namespace")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, else ~/.kube/config)")
    p.add_argument("--config", default=None,
                   help="a router.json file (policy, pools, holdTimeoutSeconds, blockSize) instead of the "
                        "<service>-engine ConfigMap")
    p.add_argument("--policy", default=None, choices=["prefix-aware", "prefix", "least-loaded", "least-load", "round-robin"],
                   help="how replicas are chosen (default: the settings' policy, else prefix-aware)")
    p.add_argument("--block-size", type=int, default=None,
                   help="the workers' KV block size (default: the settings' blockSize, else 16)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or name for exact prefix hashes")
    p.add_argument("--model", default=None, help="take the tokenizer from this model (as `kvflock serve --model`)")
    p.add_argument("--max-attempts", type=int, default=3, help="replicas tried per request before giving up")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between reads of the workers' /metrics")
    p.add_argument("--hold-seconds", type=float, default=None,
                   help="hold a request this long while no replica can take it, then 503 (default: the settings' "
                        "holdTimeoutSeconds with --service, else 0: answer 503 at once)")
    _add_access_options(p)
    p.set_defaults(func=_run_router)


def _run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from kvflock.router.app import RouterOptions, StaticDiscovery, create_app
    from kvflock.router.config import RouterSettings, read_settings_file
    from kvflock.router.discovery import KubernetesDiscovery, parse_worker_flag
    from kvflock.router.drain import DrainingServer
    from kvflock.shared import auth

    if bool(args.worker) == bool(args.service):
        raise ValueError("router: give either --worker URL (repeatable) or --service NAME")
    settings = read_settings_file(args.config) if args.config else RouterSettings()
    if args.service:
        import kubernetes.client

        from kvflock.operator.runner import load_configuration

        api_client = kubernetes.client.ApiClient(load_configuration(args.kubeconfig))
        discovery = KubernetesDiscovery(args.service, args.namespace, api_client, read_configmap=args.config is None)
    else:
        discovery = StaticDiscovery([parse_worker_flag(w) for w in args.worker])
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    elif args.model:
        from kvflock.worker.model.source import resolve_model
        from kvflock.worker.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_model(args.model))
    policy = {"prefix": "prefix-aware", "least-load": "least-loaded"}.get(args.policy, args.policy)
    internal = auth.keys_from(args.internal_token_file, auth.INTERNAL_TOKEN_FILE_ENV)
    access = auth.AccessPolicy(api_keys=auth.keys_from(args.api_key_file, auth.API_KEY_FILE_ENV),
                               requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute)
    options = RouterOptions(policy=policy, block_size=args.block_size, max_attempts=args.max_attempts,
                            poll_interval=args.poll_interval, access=access, internal_token=internal[0] if internal else None,
                            hold_seconds=args.hold_seconds)
    app = create_app(discovery, settings, tokenizer, options)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                                           log_level=args.log_level, log_config=None))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has stopped; the stop is the normal end
        pass
    return 0


def _add_local_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the local cluster's files: kubeconfig, logs (default: $KVFLOCK_HOME or ~/.kvflock)")


def _state_dir(args: argparse.Namespace) -> Path:
    from kvflock.local.localcluster import default_state_dir

    return Path(args.state_dir) if args.state_dir else default_state_dir()


def _add_up(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("up", help="run the local cluster: API server, operator, process kubelet, routers")
    _add_local_cluster_options(p)
    p.add_argument("--api-port", type=_port, default=16443, help="the API server's port on 127.0.0.1")
    p.add_argument("--router-port", type=_port, default=30080,
                   help="the first InferenceService's router port on 127.0.0.1 (the next ones count up)")
    p.add_argument("--apply", "-f", type=Path, action="append", default=[], help="apply InferenceServices from a file")
    p.add_argument("--ask", default=None,
                   help="wait until the applied services are Ready, then ask this and print the answer")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds --ask waits for Ready")
    p.add_argument("--detach", "-d", action="store_true", help="run in the background (stop it with `kvflock down`)")
    p.add_argument("--once", action="store_true", help="stop everything after --ask has its answer (a demo run)")
    p.add_argument("--operators", type=int, default=1, choices=range(1, 6), metavar="N",
                   help="operator replicas (1-5). 1 (default): in this process. 2 or more: operator pods in "
                        "kvflock-system electing a leader through kopf peering, as the chart deploys them")
    p.set_defaults(func=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from kvflock.local.up import up

    if args.once and (args.detach or not args.ask):
        raise ValueError("--once: needs --ask and cannot be combined with --detach")
    return up(_state_dir(args), args.api_port, args.router_port, args.apply, args.ask, args.detach, args.timeout,
              args.once, args.operators)


def _add_down(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("down", help="stop the local cluster and every process it runs")
    _add_local_cluster_options(p)
    p.set_defaults(func=_run_down)


def _run_down(args: argparse.Namespace) -> int:
    from kvflock.local.up import down

    return down(_state_dir(args))


def _add_status(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("status", help="show the local cluster, its InferenceServices and their workers")
    _add_local_cluster_options(p)
    p.set_defaults(func=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from kvflock.local.up import status

    return status(_state_dir(args))


def build_parser() -> argparse.ArgumentParser:
    """The `kvflock` command line with every subcommand."""
    parser = _Parser(prog="kvflock", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvflock {__version__}")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    parser.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                        help="text for people, json for a log pipeline: one object per line (default: text)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_quantize(sub)
    _add_fetch_model(sub)
    _add_crds(sub)
    _add_operator(sub)
    _add_router(sub)
    _add_up(sub)
    _add_down(sub)
    _add_status(sub)
    for subcommand in sub.choices.values():  # also after the subcommand; the main parser's default stands
        subcommand.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS)
        subcommand.add_argument("--log-format", default=argparse.SUPPRESS, choices=LOG_FORMATS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.log_level != "debug":  # one INFO line per HTTP call (the router polls its workers every second)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ValidationError as exc:  # a model not built through EngineConfig.from_file, e.g. SamplingParams
        from kvflock.worker.config import describe_errors

        print(f"kvflock {args.command}: error: {describe_errors(exc)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvflock {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
