"""The command-line tools, one module each with ``main(argv=None) -> int``.

``python tools/<name>.py`` (Megatron-LM's habit) and the console scripts of setup.py both run
these; each tool's work goes through ``platform.single_process.run_tool``.
"""
