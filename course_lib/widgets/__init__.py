"""ipywidgets dashboards for the course, one module per topic.

Every dashboard is built with :func:`course_lib.widgets.dashboard.dashboard`: the same ``draw``
function renders a static matplotlib figure (under nbval, in a frontend without widgets, or with
``interactive=False``) and the interactive version, whose figure redraws when a control changes.
"""
