"""The lead's dashboard: pages and the queries behind them."""
