"""The stages of a job's life, one room each: intake, scheduler, running, ending, fleet,
recovery and stops. README.md, "How kinod is built", shows what each owns and the path of
one job file through them. Each stage owns its own state and reaches the others only
through their public methods, by way of the shared ``Context``.
"""
