"""The device side runs with numpy + onnxruntime only: training never imports torch."""

import subprocess
import sys
import textwrap


def test_training_step_never_imports_torch(bert_bundle, sentiment_data, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys

        class Block:
            # Fail any import of the workstation stack, as on a device where it is not installed.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "peft", "onnx", "onnxscript"):
                    raise ImportError(f"{{name}} is not installed on this device")

        sys.meta_path.insert(0, Block())
        from edgeft.cli import main
        try:
            main(["train", {str(bert_bundle)!r}, "--data", {str(sentiment_data)!r}, "-o", {str(tmp_path / "run")!r},
                  "--steps", "3", "--batch-size", "4", "--json"])
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx"))
        assert not heavy, heavy
        print("NO_TORCH_OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NO_TORCH_OK" in result.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
