"""gptviz: the Gradio app. Run: python app.py"""

from gptviz.ui import LAUNCH_KWARGS, build_demo

demo = build_demo()

if __name__ == "__main__":
    demo.launch(**LAUNCH_KWARGS)
