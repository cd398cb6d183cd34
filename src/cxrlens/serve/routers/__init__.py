"""The app's routes, one router per concern: pages and info, predict and explain (with jobs), the
data set browser, and the reader study with its ratings."""

from cxrlens.serve.routers import browse, pages, predict, study

ROUTERS = (pages.router, predict.router, browse.router, study.router)

__all__ = ["ROUTERS"]
