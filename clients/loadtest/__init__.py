"""Load-testing harness: real-time sessions on an absolute clock, report, plot and capacity sweep."""
