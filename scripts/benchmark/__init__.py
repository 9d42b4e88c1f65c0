"""scripts/bench as a package: aioserver measured side by side with what a user would
pick instead. `scripts/bench` is its launcher; docs/benchmarks.md is its manual.

    common        constants, settings, the error a failed run raises
    servers       every server under test: its command line and what it needs
    procs         starting, watching and stopping the children: servers, load generator
    workloads     the throughput, memory and stop-time workloads, each with its own
                  figure, table columns and progress line
    runner        the plan of rounds, each run measured, retried when disturbed
    analysis      medians, same-round ratios and target checks: pure functions on data
    report        text and markdown tables, the chart, the generated parts of the doc
    instructions  the --instructions mode: user-space instructions counted by callgrind
    cli           the command line
"""
