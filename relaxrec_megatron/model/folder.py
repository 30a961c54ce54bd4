"""The file that marks a Megatron dist checkpoint of this project, by name only: commands tell a
folder's kind from it without importing megatron-core (seconds)."""

CONFIG_FILE = "relaxrec_config.json"  # the architecture and the recursion, beside the dist checkpoint


def is_megatron_checkpoint(folder) -> bool:
    from pathlib import Path

    return (Path(folder) / CONFIG_FILE).is_file()
