from faser_sgl.sim.cli import main

main()
