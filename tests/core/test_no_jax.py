import subprocess
import sys


def test_host_side_imports_no_jax():
    """Convention 1: the host core, engine, offline API and configs import no jax."""
    code = ("import sys\n"
            "import jaxllm.core.ngram_proposer, jaxllm.spec_config, jaxllm.engine.spec_requests\n"
            "import jaxllm.sampling_params, jaxllm.outputs, jaxllm.config\n"
            "import jaxllm.core.scheduler, jaxllm.core.kv_cache_manager, jaxllm.core.block_pool\n"
            "import jaxllm.engine.engine, jaxllm.engine.runner_protocol, jaxllm.llm, jaxllm.beam_search\n"
            "import jaxllm.scoring, jaxllm.generation_config, jaxllm.cli_args, jaxllm.sampling_args\n"
            "import jaxllm.models.classifier_config, serving.openai_score, serving.openai_classify\n"
            "import jaxllm.lora, jaxllm.lora.peft, jaxllm.lora.config, jaxllm.lora.manager, jaxllm.engine.async_engine\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
