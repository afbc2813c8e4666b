"""Makes projects/example/turntable.blend: Blender's default cube turning once in 24 frames,
small and quick to render on the CPU (Cycles, 160x120, 16 samples).

    blender --background --factory-startup --python projects/example/make_turntable.py

An optional path after ``--`` saves the file there instead.
"""

import math
import os
import sys

import bpy

args = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
path = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "turntable.blend")
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = 16
scene.cycles.use_denoising = False  # Debian's Blender is built without OpenImageDenoise
scene.render.resolution_x, scene.render.resolution_y = 160, 120
scene.render.resolution_percentage = 100
scene.frame_start, scene.frame_end = 1, 24
cube = bpy.data.objects["Cube"]
cube.rotation_euler = (0.0, 0.0, 0.0)
cube.keyframe_insert("rotation_euler", frame=1)
cube.rotation_euler = (0.0, 0.0, 2 * math.pi * 23 / 24)
cube.keyframe_insert("rotation_euler", frame=24)
for curve in cube.animation_data.action.fcurves:
    for point in curve.keyframe_points:
        point.interpolation = "LINEAR"
bpy.ops.wm.save_as_mainfile(filepath=path)
