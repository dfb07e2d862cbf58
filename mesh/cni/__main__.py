from mesh.cni.plugin import main

main()
